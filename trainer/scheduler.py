"""When cycles run: APScheduler with an interval or a crontab from the settings."""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from guardloop.core.settings import Settings

log = logging.getLogger(__name__)


class ScheduleError(ValueError):
    """The cycle schedule in the settings cannot be used."""


def cycle_trigger(settings: Settings) -> CronTrigger | IntervalTrigger:
    if settings.cycle_cron:
        try:
            return CronTrigger.from_crontab(settings.cycle_cron, timezone="UTC")
        except ValueError as exc:
            raise ScheduleError(f"GUARDLOOP_CYCLE_CRON={settings.cycle_cron!r} is not a crontab line: {exc}") from None
    if settings.cycle_interval_minutes is None:
        raise ScheduleError("no schedule: set GUARDLOOP_CYCLE_INTERVAL_MINUTES or GUARDLOOP_CYCLE_CRON")
    return IntervalTrigger(minutes=settings.cycle_interval_minutes, timezone="UTC")


def build_scheduler(settings: Settings, run_cycle: Callable[[], object], *, blocking: bool) -> BaseScheduler:
    """One job; a run still going when the next is due is skipped (max_instances=1), not queued."""
    scheduler: BaseScheduler = BlockingScheduler(timezone="UTC") if blocking else BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        run_cycle, cycle_trigger(settings), id="cycle", max_instances=1, coalesce=True, misfire_grace_time=300
    )
    return scheduler

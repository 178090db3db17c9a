"""When cycles run: APScheduler with an interval or a crontab from the settings, and a drift check every
drift_check_minutes whose drifted verdict moves the next cycle to now."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

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


def build_scheduler(
    settings: Settings,
    run_cycle: Callable[[], object],
    *,
    blocking: bool,
    check_drift: Callable[[], bool] | None = None,
) -> BaseScheduler:
    """The cycle job; a run still going when the next is due is skipped (max_instances=1), not queued. With
    `check_drift` (and drift_check_minutes set), a second job runs it at start and then every
    drift_check_minutes; when it returns True the cycle job's next run is moved to now, so a drift-started
    cycle is still the one single-flight job, never a second one beside it."""
    scheduler: BaseScheduler = BlockingScheduler(timezone="UTC") if blocking else BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        run_cycle, cycle_trigger(settings), id="cycle", max_instances=1, coalesce=True, misfire_grace_time=300
    )
    if check_drift is not None and settings.drift_check_minutes:

        def drift_job() -> None:
            if check_drift():
                log.info("traffic drifted: the next cycle starts now")
                scheduler.modify_job("cycle", next_run_time=datetime.now(UTC))

        scheduler.add_job(
            drift_job,
            IntervalTrigger(minutes=settings.drift_check_minutes, timezone="UTC"),
            id="drift",
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=300,
        )
    return scheduler

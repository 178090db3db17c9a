"""`guardloop serve` and `guardloop trainer`: the two long-running processes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
import uvicorn
from prometheus_client import start_http_server

from guardloop.cli.app import app, friendly_errors, load_settings, setup_logging
from guardloop.core.errors import UserError
from guardloop.models.registry import ModelRegistry
from guardloop.service.app import create_app
from guardloop.trainer.scheduler import ScheduleError, build_scheduler

log = logging.getLogger("guardloop.trainer")


@app.command()
@friendly_errors
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: settings, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: settings, 8000)")] = None,
    bootstrap: Annotated[bool, typer.Option(help="train a model from the seed data if the registry is empty")] = True,
    with_trainer: Annotated[
        bool, typer.Option(help="also run the scheduled active-learning cycle in this process")
    ] = False,
) -> None:
    """Serve POST /classify; with an empty registry, first train a bootstrap model from the seed data."""
    settings = load_settings()
    setup_logging(level=settings.log_level)
    bind = host or settings.host
    if not settings.api_keys and bind not in ("127.0.0.1", "::1", "localhost"):
        typer.echo(
            f"warning: serving on {bind} without API keys: anyone who reaches it can classify and fill the pool; "
            "set GUARDLOOP_API_KEYS",
            err=True,
        )
    registry = ModelRegistry(settings.registry_dir)
    if registry.current() is None and bootstrap:
        # The train extra (torch, transformers): a serve-only install never gets here with a model published.
        from guardloop.trainer.cycle import train_bootstrap_model

        typer.echo("no model in the registry yet: training a bootstrap model from the seed data", err=True)
        version = train_bootstrap_model(settings, registry)
        typer.echo(f"published bootstrap model {version}", err=True)
    scheduler = None
    if with_trainer:
        # The train extra (scikit-learn, torch): only a process that runs cycles needs them.
        from guardloop.trainer.cycle import build_cycle_runner

        runner = build_cycle_runner(settings)
        runner.export_last_promoted()  # the cycle metrics then show on this service's /metrics
        scheduler = build_scheduler(settings, guarded(runner.run), blocking=False)
        scheduler.start()
    try:
        uvicorn.run(
            create_app(settings),
            host=host or settings.host,
            port=port or settings.port,
            log_level=settings.log_level.lower(),
            access_log=settings.access_log,
        )
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)


@app.command("trainer")
@friendly_errors
def run_trainer() -> None:
    """The trainer process: runs the active-learning cycle on the configured schedule (interval or cron)."""
    setup_logging()
    # The train extra (scikit-learn, torch): a serve-only install has no trainer process.
    from guardloop.trainer.cycle import build_cycle_runner

    settings = load_settings()
    runner = build_cycle_runner(settings)
    try:
        scheduler = build_scheduler(settings, guarded(runner.run), blocking=True)
    except ScheduleError as exc:
        raise UserError(str(exc)) from None
    try:  # the cycle, LLM and variation metrics (the CycleRunner exposed them) on their own port
        start_http_server(settings.trainer_metrics_port, addr=settings.host)
    except OSError as exc:
        raise UserError(
            f"cannot serve /metrics on {settings.host}:{settings.trainer_metrics_port} ({exc.strerror or exc}); "
            "set GUARDLOOP_TRAINER_METRICS_PORT"
        ) from None
    runner.export_last_promoted()
    typer.echo(
        f"trainer: cycles on {scheduler.get_job('cycle').trigger}; "
        f"metrics on http://{settings.host}:{settings.trainer_metrics_port}/metrics",
        err=True,
    )
    scheduler.start()


def guarded(run: Callable[[], Any]) -> Callable[[], None]:
    """A scheduled cycle logs what stopped it (busy lock, failure) instead of killing the scheduler."""

    def job() -> None:
        from guardloop.trainer.cycle import CycleBusy  # the train extra, as above

        try:
            cycle = run()
            log.info(
                "cycle %s ended this run as %s%s", cycle.id, cycle.status, f": {cycle.reason}" if cycle.reason else ""
            )
        except CycleBusy as exc:
            log.info("cycle skipped: %s", exc)
        except Exception:
            log.exception("cycle run failed")

    return job

"""`guardloop serve` and `guardloop trainer`: the two long-running processes."""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
import uvicorn
from prometheus_client import start_http_server

from guardloop.cli.app import app, check_database_url, friendly_errors, load_settings, setup_logging
from guardloop.core.errors import UserError
from guardloop.core.policy import PolicyError
from guardloop.core.settings import Settings
from guardloop.models.registry import ModelRegistry
from guardloop.service.app import create_app
from guardloop.service.policy_store import read_policies
from guardloop.service.workers import forget_earlier_processes, shared_metrics_dir
from guardloop.storage import DatabaseUnavailable, StorageError, upgrade_database
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
    check_database_url(settings)  # every check here runs before a model is loaded or trained
    if settings.policy_path is not None:  # the service would refuse to start on it; say why in one line
        try:
            read_policies(settings.policy_path, settings.api_keys)
        except PolicyError as exc:
            raise UserError(f"GUARDLOOP_POLICY_PATH: {exc}") from None
    check_bindable(bind, port or settings.port, "--port" if port else "GUARDLOOP_PORT", "--port or GUARDLOOP_PORT")
    if with_trainer and settings.workers > 1:
        raise UserError(
            f"--with-trainer runs cycles inside the one serving process, and GUARDLOOP_WORKERS={settings.workers} "
            "asks for several: run `guardloop trainer` beside `guardloop serve`, or set GUARDLOOP_WORKERS=1"
        )
    if not settings.api_keys and bind not in ("127.0.0.1", "::1", "localhost"):
        typer.echo(
            f"warning: serving on {bind} without API keys: anyone who reaches it can classify and fill the pool; "
            "set GUARDLOOP_API_KEYS",
            err=True,
        )
    registry = ModelRegistry(settings.registry_dir)
    if registry.current() is None and bootstrap:
        # The train extra (torch, transformers): a serve-only install never gets here with a model published.
        from guardloop.trainer.train import train_bootstrap_model

        typer.echo("no model in the registry yet: training a bootstrap model from the seed data", err=True)
        version = train_bootstrap_model(settings, registry)
        typer.echo(f"published bootstrap model {version}", err=True)
    scheduler = None
    if with_trainer:
        # The train extra (scikit-learn, torch): only a process that runs cycles needs them.
        from guardloop.trainer.cycle import build_cycle_runner
        from guardloop.trainer.monitor import build_monitor_job

        runner = build_cycle_runner(settings)
        runner.export_last_promoted()  # the cycle metrics then show on this service's /metrics
        check_drift = build_monitor_job(settings, runner.database, runner.registry)
        try:
            scheduler = build_scheduler(settings, guarded(runner.run), blocking=False, check_drift=check_drift)
        except ScheduleError as exc:
            raise UserError(str(exc)) from None
        scheduler.start()
    server = {
        "host": bind,
        "port": port or settings.port,
        "log_level": settings.log_level.lower(),
        "access_log": settings.access_log,
    }
    if settings.workers > 1:
        serve_workers(settings, server)
        return
    # Process-wide, so here and not in create_app: the event loop and the inference threads share one GIL
    # (the setting's comment says why the default is shorter than Python's).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    forget_earlier_processes()
    try:
        uvicorn.run(create_app(settings, settle_gc=True), **server)
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)


def serve_workers(settings: Settings, server: dict[str, Any]) -> None:
    """Several worker processes on one socket (service/workers.py says what they share and how)."""
    try:  # once, here: workers starting together on a new SQLite file would race to create its tables
        upgrade_database(settings.database_url_value)
    except DatabaseUnavailable as exc:
        typer.echo(f"warning: {exc}; each worker applies the migrations once it answers", err=True)
    except StorageError as exc:
        raise UserError(f"GUARDLOOP_DATABASE_URL: {exc}") from None
    with shared_metrics_dir():
        uvicorn.run("guardloop.service.app:create_worker_app", factory=True, workers=settings.workers, **server)


@app.command("trainer")
@friendly_errors
def run_trainer() -> None:
    """The trainer process: runs the active-learning cycle on the configured schedule (interval or cron)."""
    setup_logging()
    settings = load_settings()
    check_database_url(settings)
    port_setting = "GUARDLOOP_TRAINER_METRICS_PORT"
    check_bindable(settings.host, settings.trainer_metrics_port, port_setting, port_setting)
    # The train extra (scikit-learn, torch): a serve-only install has no trainer process.
    from guardloop.trainer.cycle import build_cycle_runner
    from guardloop.trainer.monitor import build_monitor_job

    runner = build_cycle_runner(settings)
    check_drift = build_monitor_job(settings, runner.database, runner.registry)
    try:
        scheduler = build_scheduler(settings, guarded(runner.run), blocking=True, check_drift=check_drift)
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


def check_bindable(host: str, port: int, name: str, setting: str) -> None:
    """Refuse, in one line naming the setting (`name`; `setting` says where to change it), a port out of range or
    one this process cannot listen on (in use, not permitted, an address this machine does not have), before
    anything slow starts."""
    if not 1 <= port <= 65535:
        raise UserError(f"{name}: port {port} is out of range; choose one in 1..65535 with {setting}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"GUARDLOOP_HOST: cannot listen on {host!r} ({exc.strerror}); set it or --host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                problem = f"port {port} is in use on {host}; choose another with {setting}"
            elif exc.errno == errno.EACCES:
                problem = f"port {port} needs privileges on {host}; choose one above 1023 with {setting}"
            else:
                problem = f"cannot listen on {host}:{port} ({exc.strerror}); set GUARDLOOP_HOST or {setting}"
            raise UserError(f"{name}: {problem}") from None


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

"""The Typer application every command module registers on, and what commands share: the one-line error
handling (a user's or operator's mistake is `error: ...` on stderr and exit 2, never a traceback), settings,
logging, and the few argument helpers several command groups use."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import Any, TextIO, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from guardloop.core.datafiles import BadRow, DataFileError, LoadedData, load_examples
from guardloop.core.errors import UserError
from guardloop.core.settings import Settings
from guardloop.core.settings_errors import describe_settings_error, unknown_variables
from guardloop.models.onnx_model import ModelLoadError
from guardloop.models.registry import ModelRegistry, RegistryError
from guardloop.storage import Database, ReviewError, StorageError
from guardloop.storage.db import parse_database_url
from guardloop.trainer.base_models import BaseModelMissing

app = typer.Typer(
    help="guardloop: a safety classifier that keeps learning from the traffic it guards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

# Exceptions that carry a message for the person at the keyboard: bad files, settings, versions, databases.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    DataFileError,
    RegistryError,
    ModelLoadError,
    ValidationError,
    SettingsError,
    BaseModelMissing,
    StorageError,
    ReviewError,
)


def friendly_errors(func: F) -> F:
    """Turn a user error raised by the command into one `error: ...` line and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as exc:
            message = describe_settings_error(exc)  # a setting's problem: its name, what is wrong, what to fix
            if message is None and isinstance(exc, ValidationError):
                message = " ".join(str(exc).split())
            elif message is None:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


_warned_unknown = False


def load_settings() -> Settings:
    """The settings; the first call also warns (stderr) about GUARDLOOP_* variables no setting reads."""
    global _warned_unknown
    if not _warned_unknown:
        _warned_unknown = True
        for warning in unknown_variables():
            typer.echo(f"warning: {warning}", err=True)
    return Settings()


def check_database_url(settings: Settings) -> None:
    """Refuse a database URL that cannot work before anything starts (a server would only fail in its lifespan)."""
    try:
        parse_database_url(settings.database_url_value)
    except StorageError as exc:
        raise UserError(f"GUARDLOOP_DATABASE_URL: {exc}; fix or unset GUARDLOOP_DATABASE_URL") from None


class CurrentStderrHandler(logging.StreamHandler):
    """Writes each record to sys.stderr as it is then, not as it was when logging was set up: a command run inside
    another program (a test's CliRunner, a notebook) swaps sys.stderr per run, and a handler holding the first
    run's stream printed "--- Logging error ---" tracebacks into every later run once that stream was closed."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(verbose: bool = False, level: str | None = None) -> None:
    logging.basicConfig(
        level=level or (logging.DEBUG if verbose else logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[CurrentStderrHandler()],
    )
    if level == "DEBUG":
        # SQLAlchemy holds its loggers at WARNING unless told. Its statements log at INFO (their parameters hidden
        # by the engine); result rows at DEBUG: those are users' texts, so the engine's logger stops at INFO.
        logging.getLogger("sqlalchemy").setLevel(logging.DEBUG)
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)


def parse_column(value: str | None) -> str | int | None:
    """A --text-column/--label-column value: a 0-based index when it is all digits, else a header name."""
    return None if value is None else int(value) if value.isdigit() else value


def report_bad_rows(bad_rows: Iterable[BadRow]) -> None:
    """One stderr line per row that --skip-bad-rows skipped."""
    for bad in bad_rows:
        typer.echo(f"skipped {bad.path}:{bad.line}: {bad.reason}", err=True)


def load_labeled(
    files: list[Path], text_column: str | None, label_column: str | None, skip_bad_rows: bool
) -> LoadedData:
    """Labeled examples from the files a command was given (its --text-column, --label-column and
    --skip-bad-rows options), with one stderr line per skipped row."""
    loaded = load_examples(
        files,
        text_column=parse_column(text_column),
        label_column=parse_column(label_column),
        skip_bad_rows=skip_bad_rows,
    )
    report_bad_rows(loaded.bad_rows)
    return loaded


def open_registry() -> ModelRegistry:
    """The configured model registry (GUARDLOOP_REGISTRY_DIR)."""
    return ModelRegistry(load_settings().registry_dir)


def open_database() -> Database:
    """The configured database (GUARDLOOP_DATABASE_URL, else <data_dir>/guardloop.db), migrated."""
    settings = load_settings()
    check_database_url(settings)
    database = Database(settings.database_url_value)
    database.ensure_schema()
    return database

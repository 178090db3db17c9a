"""`guardloop models ...`: list, inspect, promote and roll back versions of the model registry."""

from __future__ import annotations

from typing import Annotated

import typer

from guardloop.cli.app import app, friendly_errors, open_registry
from guardloop.core.errors import UserError

models_app = typer.Typer(help="The model registry: list, inspect, promote, roll back.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
@friendly_errors
def models_list() -> None:
    """Published versions, oldest first; * marks the current one."""
    registry = open_registry()
    current = registry.current()
    versions = registry.versions()
    if not versions:
        typer.echo("no published versions")
    for version in versions:
        card = registry.card(version)
        f1 = (card.metrics.get("dev") or {}).get("macro_f1")
        mark = "*" if version == current else " "
        typer.echo(
            f"{mark} {version}  {card.created_at:%Y-%m-%d %H:%M}  dev macro-F1 "
            f"{'n/a' if f1 is None else f'{f1:.4f}'}  parent {card.parent or '-'}"
        )


@models_app.command("show")
@friendly_errors
def models_show(version: Annotated[str | None, typer.Argument(help="default: current")] = None) -> None:
    """Print a version's model card as JSON."""
    registry = open_registry()
    version = version or registry.current()
    if version is None:
        raise UserError("no current model; name a version")
    typer.echo(registry.card(version).model_dump_json(indent=2))


@models_app.command("promote")
@friendly_errors
def models_promote(version: str) -> None:
    """Make VERSION current; running services follow within their poll interval."""
    open_registry().promote(version)
    typer.echo(f"current is now {version}")


@models_app.command("rollback")
@friendly_errors
def models_rollback() -> None:
    """Switch current back to the version that was current before."""
    typer.echo(f"current is now {open_registry().rollback()}")

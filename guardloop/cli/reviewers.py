"""`guardloop reviewers ...`: reviewer accounts for /review (tokens are shown once, stored only as hashes)."""

from __future__ import annotations

from typing import Annotated

import typer

from guardloop.cli.app import app, friendly_errors, open_database
from guardloop.storage import ReviewerRepository

reviewers_app = typer.Typer(help="Reviewer accounts for /review: add, list, rotate, revoke.", no_args_is_help=True)
app.add_typer(reviewers_app, name="reviewers")


@reviewers_app.command("add")
@friendly_errors
def reviewers_add(name: Annotated[str, typer.Argument(help="the reviewer's name (letters, digits, . _ @ -)")]) -> None:
    """Create a reviewer and print their token once; only its hash is stored."""
    token = ReviewerRepository(open_database()).add(name)
    typer.echo(token)
    typer.echo(f"reviewer {name} added; the token above is shown only now: hand it over privately", err=True)


@reviewers_app.command("rotate")
@friendly_errors
def reviewers_rotate(name: str) -> None:
    """Give a reviewer a new token (the old one stops working); prints it once."""
    token = ReviewerRepository(open_database()).rotate(name)
    typer.echo(token)
    typer.echo(f"new token for {name}; the old one no longer works", err=True)


@reviewers_app.command("revoke")
@friendly_errors
def reviewers_revoke(name: str) -> None:
    """Stop a reviewer's token from working (their labels stay)."""
    ReviewerRepository(open_database()).revoke(name)
    typer.echo(f"revoked {name}")


@reviewers_app.command("list")
@friendly_errors
def reviewers_list() -> None:
    """Reviewers and whether their token works (tokens are never shown again)."""
    reviewers = ReviewerRepository(open_database()).list()
    if not reviewers:
        typer.echo("no reviewers; add one with `guardloop reviewers add NAME`")
    for reviewer in reviewers:
        state = f"revoked {reviewer.revoked_at:%Y-%m-%d}" if reviewer.revoked_at else "active"
        typer.echo(f"{reviewer.name:<32} added {reviewer.created_at:%Y-%m-%d %H:%M}  {state}")

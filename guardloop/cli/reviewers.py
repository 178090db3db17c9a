"""`guardloop reviewers ...`: reviewer accounts for /review (tokens are shown once, stored only as hashes), and how
far reviewers agree."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from guardloop.cli.app import app, friendly_errors, open_database
from guardloop.storage import ReviewerRepository
from guardloop.storage.agreement import read_agreement

reviewers_app = typer.Typer(
    help="Reviewer accounts for /review: add, list, rotate, revoke; their agreement.", no_args_is_help=True
)
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


@reviewers_app.command("agreement")
@friendly_errors
def reviewers_agreement(
    as_json: Annotated[bool, typer.Option("--json", help="print the numbers as one JSON object")] = False,
) -> None:
    """How far reviewers agree on items with two or more live labels: Krippendorff's alpha (nominal) overall and
    one-vs-rest per class, alpha and Cohen's kappa per reviewer pair ("-": undefined, e.g. fewer than 2 items)."""
    agreement = read_agreement(open_database())
    if as_json:
        typer.echo(json.dumps(agreement.as_json(), indent=2))
        return
    typer.echo(f"items with 2+ labels: {agreement.items} ({agreement.labels} labels)")
    typer.echo(f"alpha (nominal): {_number(agreement.alpha)}")
    for label, alpha in agreement.by_class.items():
        typer.echo(f"  {label:<22} alpha {_number(alpha)}")
    if not agreement.pairs:
        typer.echo("no reviewer pair shares an item yet")
    for pair in agreement.pairs:
        first, second = pair.reviewers
        typer.echo(
            f"{first} / {second}: {pair.items} items, alpha {_number(pair.alpha)}, kappa {_number(pair.cohen_kappa)}"
        )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

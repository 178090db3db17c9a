"""`guardloop pool ...`: what the pool of uncertain traffic holds; export it; purge what retention allows."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from guardloop.cli.app import app, friendly_errors, load_settings, open_database
from guardloop.core.errors import UserError
from guardloop.storage import PoolRepository
from guardloop.storage.exchange import LabelExchange
from guardloop.storage.exchange_formats import FORMATS, ExchangeError, parse_records

pool_app = typer.Typer(help="The pool of uncertain traffic: stats, export, import, purge.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")


@pool_app.command("stats")
@friendly_errors
def pool_stats(as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False) -> None:
    """How many items the pool holds, why they were kept, how many are requested and labeled."""
    stats = PoolRepository(open_database()).stats()
    if as_json:
        typer.echo(json.dumps(stats.as_json()))
        return
    typer.echo(f"items            {stats.items} ({stats.seen_total} sightings)")
    typer.echo(f"  uncertain      {stats.uncertain_items}")
    typer.echo(f"  random sample  {stats.sampled_items}")
    typer.echo(f"requested        {stats.requested_items}")
    typer.echo(f"labeled          {stats.labeled_items}")
    typer.echo(f"first seen       {stats.oldest_first_seen or '-'}")
    typer.echo(f"last seen        {stats.newest_last_seen or '-'}")
    for label, count in sorted(stats.by_label.items()):
        typer.echo(f"  predicted {label:<22}{count:>8}")


@pool_app.command("export")
@friendly_errors
def pool_export(
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="jsonl (one JSON object per line), label-studio (task JSON) or argilla (record JSON): "
            "the tools' formats carry the answers and the model's guess as a pre-annotation",
        ),
    ] = "jsonl",
    output: Annotated[Path | None, typer.Option(help="file to write (default: stdout)")] = None,
    requested_only: Annotated[bool, typer.Option(help="only items requested for labeling")] = False,
) -> None:
    """Every pool item with its text, prediction, scores, counts and request reason."""
    if export_format not in ("jsonl", *FORMATS):
        raise UserError(f"unsupported format {export_format!r}; use --format jsonl, label-studio or argilla")
    database = open_database()
    if export_format in FORMATS:  # one JSON array, as the tools import it
        records = list(LabelExchange(database).export(export_format, requested_only=requested_only))
        _write(output, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
        typer.echo(f"exported {len(records)} items as {export_format} to {output or 'stdout'}", err=True)
        return
    rows = PoolRepository(database).export(requested_only=requested_only)
    if output is None:
        count = 0
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
            count += 1
        typer.echo(f"exported {count} items", err=True)
        return
    if output.parent and not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such directory")
    # Written next to the target and renamed into place: a failed export leaves no half file.
    fd, tmp_name = tempfile.mkstemp(dir=output.parent or Path("."), prefix=f".{output.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    typer.echo(f"exported {count} items to {output}", err=True)


def _write(output: Path | None, text: str) -> None:
    if output is None:
        typer.echo(text, nl=False)
        return
    if output.parent and not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such directory")
    fd, tmp_name = tempfile.mkstemp(dir=output.parent or Path("."), prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, output)  # no half-written file
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


@pool_app.command("import")
@friendly_errors
def pool_import(
    path: Annotated[Path, typer.Argument(help="a Label Studio JSON export or an Argilla records JSON file")],
    import_format: Annotated[str, typer.Option("--format", help="label-studio or argilla")],
    dry_run: Annotated[bool, typer.Option(help="check the file and count, store nothing")] = False,
) -> None:
    """Answers given in Label Studio or Argilla, stored as reviewer answers; a file with one bad record imports
    nothing. Import into the database the items were exported from."""
    if import_format not in FORMATS:
        raise UserError(f"unsupported format {import_format!r}; use --format label-studio or argilla")
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        answers = parse_records(import_format, records)
        outcome = LabelExchange(open_database()).import_answers(answers, dry_run=dry_run)
    except ExchangeError as exc:
        raise UserError(f"{path}: {exc}; nothing imported") from None
    verb = "would import" if dry_run else "imported"
    typer.echo(
        f"{verb} {outcome.new + outcome.corrected} answers for {outcome.items} items from {path} "
        f"({outcome.new} new, {outcome.corrected} corrected, {outcome.unchanged} unchanged)"
    )


@pool_app.command("purge")
@friendly_errors
def pool_purge(
    older_than_days: Annotated[
        float | None, typer.Option(min=0, help="age in days (default: the pool_retention_days setting)")
    ] = None,
    include_labeled: Annotated[bool, typer.Option(help="also delete labeled items (the training set)")] = False,
) -> None:
    """Delete items not seen for the retention period; labeled items stay unless --include-labeled."""
    days = load_settings().pool_retention_days if older_than_days is None else older_than_days
    cutoff = datetime.now(UTC) - timedelta(days=days)
    purged = PoolRepository(open_database()).purge(older_than=cutoff, include_labeled=include_labeled)
    typer.echo(f"purged {purged} items not seen since {cutoff:%Y-%m-%d %H:%M} UTC")

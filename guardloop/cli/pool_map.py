"""`guardloop pool map`: the pool drawn in two dimensions, as a PNG (trainer/pool_map.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from guardloop.cli.app import friendly_errors, load_settings, open_database
from guardloop.cli.pool import pool_app
from guardloop.core.errors import UserError


@pool_app.command("map")
@friendly_errors
def pool_map(
    output: Annotated[Path, typer.Option(help="PNG file to write")],
    items: Annotated[int | None, typer.Option(min=2, help="newest items drawn (default: pool_map_items, 5000)")] = None,
) -> None:
    """Draw the newest pool items in 2-D (t-SNE of their sentence embeddings), coloured by predicted label, with the
    latest cycle's picks, reviewed items and rare classes marked, beside the class shares over time."""
    if output.suffix.lower() != ".png":
        raise UserError(f"{output}: the map is a PNG; name the file *.png")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such directory")
    settings = load_settings()
    limit = items or settings.pool_map_items or 5000
    database = open_database()
    # The train extra (scikit-learn, matplotlib, the embedder): imported only when a map is drawn.
    from guardloop.trainer.embeddings import SentenceEmbedder
    from guardloop.trainer.pool_map import EmptyPool, render_pool_map

    try:
        timings = render_pool_map(
            database, lambda: SentenceEmbedder(settings.data_dir / "cache"), output, limit=limit, seed=settings.seed
        )
    except EmptyPool as exc:
        raise UserError(str(exc)) from None
    parts = ", ".join(
        f"{name} {timings[f'{part}_seconds']:.1f} s ({timings[f'{part}_cpu_seconds']:.1f} s CPU)"
        for part, name in (("embed", "embedding"), ("project", "projection"), ("draw", "drawing"))
    )
    typer.echo(f"pool map of {timings['items']} items written to {output}: {parts}", err=True)

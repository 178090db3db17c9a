"""`guardloop bench label-check`: how many deliberately flipped labels the suspected-mislabel check catches.

A simulated review queue: `queue_size` labeled texts drawn from a file, `flips` of them given a wrong label
(another of the six, at random). The cycle's own check (trainer/label_check.py, the same call the cycle and
simulate make) runs over the base training data plus that queue; printed per seed: flipped labels caught, false
flags among the untouched ones, precision, and how many cleanlab named before the max-share cap.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from guardloop.core.datafiles import Example, load_examples
from guardloop.core.errors import UserError
from guardloop.core.labels import LABELS
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.label_check import find_suspects


@dataclass(frozen=True)
class FlipRun:
    seed: int
    caught: int
    false_flags: int
    unflipped: int
    named_before_cap: int
    seconds: float


def flip_queue(queue: Sequence[Example], flips: int, seed: int) -> tuple[list[Example], set[int]]:
    """The queue with `flips` labels replaced by another label; and which positions were flipped."""
    rng = np.random.default_rng(seed)
    flipped = {int(i) for i in rng.choice(len(queue), size=flips, replace=False)}
    out = []
    for i, ex in enumerate(queue):
        if i in flipped:
            others = [label for label in LABELS if label != ex.label]
            out.append(Example(ex.text, others[int(rng.integers(len(others)))]))
        else:
            out.append(ex)
    return out, flipped


def run_label_check_bench(
    *,
    base_files: Sequence[Path],
    queue_file: Path,
    queue_size: int,
    flips: int,
    seeds: Sequence[int],
    folds: int,
    max_share: float,
    cache_dir: Path,
) -> list[FlipRun]:
    base = load_examples(list(base_files)).examples
    pool = load_examples([queue_file]).examples
    if queue_size > len(pool):
        raise UserError(f"--queue-size {queue_size} is more than the {len(pool)} labeled texts in {queue_file}")
    if not 0 < flips <= queue_size:
        raise UserError(f"--flips must be between 1 and --queue-size ({queue_size})")
    embedder = SentenceEmbedder(cache_dir)
    base_embeddings = embedder.embed([ex.text for ex in base])
    typer.echo(
        f"base {len(base)} labels, queue {queue_size} of {len(pool)} from {queue_file.name}, {flips} flipped, "
        f"{folds} folds, max share {max_share}"
    )
    runs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        picked = [pool[int(i)] for i in rng.choice(len(pool), size=queue_size, replace=False)]
        queue, flipped = flip_queue(picked, flips, seed)
        started = time.perf_counter()
        embeddings = embedder.embed([ex.text for ex in queue])
        result = find_suspects(
            base_embeddings,
            [ex.label or "" for ex in base],
            embeddings,
            [ex.label or "" for ex in queue],
            [True] * len(queue),
            random_state=seed,
            folds=folds,
            max_share=max_share,
        )
        flagged = {s.index for s in result.suspects}
        run = FlipRun(
            seed=seed,
            caught=len(flagged & flipped),
            false_flags=len(flagged - flipped),
            unflipped=queue_size - flips,
            named_before_cap=result.flagged_before_cap,
            seconds=round(time.perf_counter() - started, 2),
        )
        precision = run.caught / len(flagged) if flagged else 0.0
        typer.echo(
            f"seed {seed}: caught {run.caught}/{flips} flipped, false flags {run.false_flags}/{run.unflipped} "
            f"unflipped, precision {precision:.2f}, cleanlab named {run.named_before_cap} before the cap, "
            f"{run.seconds}s"
        )
        runs.append(run)
    if len(runs) > 1:
        typer.echo(
            f"mean over {len(runs)} seeds: caught {statistics.mean(r.caught for r in runs):.1f}/{flips}, "
            f"false flags {statistics.mean(r.false_flags for r in runs):.1f}/{queue_size - flips}"
        )
    return runs

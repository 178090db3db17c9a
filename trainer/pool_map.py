"""A picture of the pool: its texts in two dimensions (t-SNE of the sentence embeddings), coloured by predicted
label, with the latest cycle's picks, the reviewed items and the rare classes marked; beside it, the class
shares of traffic over time. `guardloop pool map` draws it on demand; the trainer redraws it after every drift
check into the ops directory, where the service shows it at /ops (the service imports nothing from here).

t-SNE (scikit-learn, already a dependency of the train extra) rather than UMAP: umap-learn would add numba and
llvmlite to the trainer image and JIT-compile on each fresh pod, and for 5,000 points t-SNE after a 50-d PCA is
well within the minute (README, "Drift, label-free estimates and the pool map"). The projection only has to show
neighbourhoods: distances between far-apart clusters mean nothing in either.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from guardloop.trainer.embeddings import Embedder

from guardloop.core.labels import LABELS
from guardloop.storage import RANDOM_SAMPLE, Database, PoolRepository, ReviewRepository, StoredItem

# A class is "rare" on the map below this share of the mapped items: drawn last, larger, outlined.
RARE_SHARE = 0.05
# Shares over time need enough items per bin to be shares at all; fewer bins than this say nothing over time.
MIN_PER_BIN = 5
COLOURS = {  # colour-blind safe (Okabe-Ito); the harmless majority in grey so the categories stand out
    "self-harm": "#D55E00",
    "medical-advice": "#0072B2",
    "legal-advice": "#009E73",
    "financial-advice": "#E69F00",
    "emergency-situation": "#CC79A7",
    "not-harmful": "#BBBBBB",
}


@dataclass(frozen=True)
class MapItems:
    """What the map draws, one entry per pool item (newest first)."""

    texts: list[str]
    labels: list[str]  # predicted label, as logged at classification time
    seen: list[datetime]
    sampled: np.ndarray  # bool: a random sample of traffic (not kept for being uncertain)
    picked: np.ndarray  # bool: requested for labeling by the latest cycle that requested any
    reviewed: np.ndarray  # bool: has a final label
    cycle_id: str | None


def gather(database: Database, limit: int) -> MapItems:
    """The newest `limit` pool items with their marks, from the database."""
    database.ensure_schema()
    items: list[StoredItem] = sorted(PoolRepository(database).iter_items(), key=lambda i: i.last_seen, reverse=True)
    items = items[:limit]
    reviewed_ids = {final.item_id for final in ReviewRepository(database).final_labels()}
    requests = [(item.requested_at, (item.request_reason or {}).get("cycle_id")) for item in items]
    latest = max((r for r in requests if r[0] is not None and r[1]), default=(None, None), key=lambda r: r[0])[1]
    return MapItems(
        texts=[item.text for item in items],
        labels=[item.label for item in items],
        seen=[item.first_seen for item in items],
        sampled=np.array([item.sampled_by == RANDOM_SAMPLE for item in items], dtype=bool),
        picked=np.array([latest is not None and cycle == latest for _, cycle in requests], dtype=bool),
        reviewed=np.array([item.id in reviewed_ids for item in items], dtype=bool),
        cycle_id=latest,
    )


def project(embeddings: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-D coordinates: PCA to 50 dimensions (denoises, and t-SNE's neighbour search is faster there), then
    Barnes-Hut t-SNE with a perplexity that small pools can carry."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(embeddings)
    if n < 3:
        return np.zeros((n, 2)) if n != 2 else np.array([[-1.0, 0.0], [1.0, 0.0]])
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    # One thread for BLAS and OpenMP: their worker threads spin while waiting, and on a shared machine (a trainer
    # beside a cycle, `serve --with-trainer`) two spinning threads made t-SNE of 300 points cost 5.2 s of CPU
    # instead of 0.4 s (measured here under load).
    with threadpool_limits(limits=1):
        reduced = PCA(n_components=min(50, n - 1, embeddings.shape[1]), random_state=seed).fit_transform(embeddings)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500, n_jobs=1)
        return tsne.fit_transform(reduced)


def class_shares(labels: Sequence[str], seen: Sequence[datetime], *, max_bins: int = 24) -> tuple[list, np.ndarray]:
    """(bin start times, bins x LABELS shares) of predicted labels by first sighting, in equal-width time bins."""
    if not labels:
        return [], np.zeros((0, len(LABELS)))
    stamps = np.array([moment.timestamp() for moment in seen])
    bins = int(max(1, min(max_bins, len(labels) // MIN_PER_BIN)))
    edges = np.linspace(stamps.min(), stamps.max() + 1e-6, bins + 1)
    which = np.clip(np.searchsorted(edges, stamps, side="right") - 1, 0, bins - 1)
    counts = np.zeros((bins, len(LABELS)))
    for b, label in zip(which, labels, strict=True):
        counts[b, LABELS.index(label)] += 1
    totals = counts.sum(axis=1, keepdims=True)
    keep = totals[:, 0] > 0
    starts = [datetime.fromtimestamp(edge, tz=seen[0].tzinfo) for edge in edges[:-1]]
    return [s for s, k in zip(starts, keep, strict=True) if k], counts[keep] / totals[keep]


def draw(items: MapItems, coords: np.ndarray, output: Path, *, title: str = "guardloop pool") -> None:
    """Both panels into `output` (PNG), written beside it and renamed: a reader never sees half an image."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod or a test
    import matplotlib.pyplot as plt

    labels = np.array(items.labels)
    shares = {label: float(np.mean(labels == label)) if len(labels) else 0.0 for label in LABELS}
    rare = {label for label, share in shares.items() if 0 < share < RARE_SHARE}
    fig, (ax_map, ax_time) = plt.subplots(1, 2, figsize=(16, 7.5), gridspec_kw={"width_ratios": [1.25, 1]})
    # Common classes first, rare ones on top, so a few emergency texts are not buried under thousands of others.
    for label in sorted(LABELS, key=lambda name: (name in rare, -shares[name])):
        mask = labels == label
        if not mask.any():
            continue
        tag = f"{label} ({shares[label]:.1%}{', rare' if label in rare else ''})"
        ax_map.scatter(
            coords[mask, 0],
            coords[mask, 1],
            s=28 if label in rare else 7,
            c=COLOURS[label],
            edgecolors="black" if label in rare else "none",
            linewidths=0.6,
            alpha=0.95 if label in rare else 0.6,
            label=tag,
        )
    # A ring around the point for reviewed items, a star on it for picks: a picked item that is reviewed shows both.
    if items.reviewed.any():
        ax_map.scatter(*coords[items.reviewed].T, s=170, facecolors="none", edgecolors="#7A0019", linewidths=1.4,
                       label=f"reviewed ({int(items.reviewed.sum())})")  # fmt: skip
    if items.picked.any():
        ax_map.scatter(*coords[items.picked].T, s=70, marker="*", c="black",
                       label=f"picked by {items.cycle_id} ({int(items.picked.sum())})")  # fmt: skip
    ax_map.set_title(f"{title}: {len(labels)} newest items, t-SNE of sentence embeddings, colour = predicted label")
    ax_map.set_xticks([])
    ax_map.set_yticks([])
    ax_map.legend(loc="best", fontsize=8, markerscale=1.5, framealpha=0.85)

    use_sampled = int(items.sampled.sum()) >= 10 * MIN_PER_BIN  # the unbiased sample, when there is enough of it
    chosen = items.sampled if use_sampled else np.ones(len(labels), dtype=bool)
    starts, fractions = class_shares(
        list(labels[chosen]), [moment for moment, keep in zip(items.seen, chosen, strict=True) if keep]
    )
    if len(starts) >= 2:
        ax_time.stackplot(starts, fractions.T, colors=[COLOURS[label] for label in LABELS], labels=list(LABELS))
        ax_time.set_ylim(0, 1)
        ax_time.legend(loc="upper left", fontsize=8)
        fig.autofmt_xdate()
    else:
        ax_time.text(0.5, 0.5, "too few items to show shares over time", ha="center", va="center")
    source = "randomly sampled traffic" if use_sampled else "all pool items (uncertain + sampled)"
    ax_time.set_title(f"class shares by first sighting: {source} ({int(chosen.sum())} items)")
    ax_time.set_ylabel("share of predicted labels")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


class EmptyPool(ValueError):
    """The pool holds no items: there is nothing to draw."""


def render_pool_map(
    database: Database, make_embedder: Callable[[], Embedder], output: Path, *, limit: int, seed: int = 0
) -> dict[str, float]:
    """Gather, embed, project and draw the newest `limit` items into `output`; returns the item count and the
    wall and CPU seconds of each part (embedding is cached by text, so it is mostly paid once per text). CPU
    seconds are this process's, all threads: on a busy machine they say what the part costs, wall time does not."""
    marks = [(time.perf_counter(), time.process_time())]
    items = gather(database, limit)
    if not items.texts:
        raise EmptyPool("the pool is empty: nothing to map yet")
    marks.append((time.perf_counter(), time.process_time()))
    embeddings = make_embedder().embed(items.texts)  # opened only for a pool with items: it may export MiniLM
    marks.append((time.perf_counter(), time.process_time()))
    coords = project(embeddings, seed=seed)
    marks.append((time.perf_counter(), time.process_time()))
    draw(items, coords, output)
    marks.append((time.perf_counter(), time.process_time()))
    timings: dict[str, float] = {"items": len(items.texts)}
    for part, (before, after) in zip(("gather", "embed", "project", "draw"), itertools.pairwise(marks), strict=True):
        timings[f"{part}_seconds"] = round(after[0] - before[0], 2)
        timings[f"{part}_cpu_seconds"] = round(after[1] - before[1], 2)
    return timings

"""The simulation's variation maker: a started VariationGenerator behind a cache file, so strategies and seeds
that pick the same item reuse its rewrites (the LLM is the slow part of a simulation)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardloop.trainer import steps
from guardloop.trainer.variations import consistency_filter


def llm_variation_maker(generator: Any, cache_file: Path | None = None) -> steps.VariationMaker:
    """Adapt a started VariationGenerator for simulations.

    The LLM's verified rewrites (hygiene and verifier passed; how many the verifier judged and rejected) are
    cached by (label, text, k, verifier on or off) in `cache_file`, so strategies and seeds that pick the same
    item reuse them (the LLM is the slow part here); the consistency filter is applied afterwards with the model
    of the current iteration, exactly as in a live cycle.
    """
    cache: dict[str, list[str]] = {}
    judged: dict[str, tuple[int, int]] = {}  # key -> (verified, rejected)
    if cache_file is not None and cache_file.is_file():
        for line in cache_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                cache[entry["key"]] = entry["variations"]
                judged[entry["key"]] = (entry.get("verified", 0), entry.get("rejected", 0))
    # Rewrites verified once are not the same as rewrites never verified: the two never share a cache entry.
    verifying = "verified" if getattr(generator.config, "verifier", None) is not None else ""

    def key(text: str, label: str) -> str:
        rounds = getattr(generator.config, "rounds", 1)
        shape = f"{generator.config.k}" if rounds == 1 else f"{generator.config.k}x{rounds}"  # 1: the old keys
        return hashlib.sha256(f"{label}\x00{shape}\x00{verifying}{text}".encode()).hexdigest()

    def compose_key(text: str, label: str, companions: Sequence[str], want: int) -> str:
        parts = ["compose", label, str(want), verifying, text, *companions]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def remember(entry_key: str, result: Any, label: str, sources: Sequence[str] = ()) -> None:
        cache[entry_key] = result.accepted
        judged[entry_key] = (result.verified, result.rejected)
        if cache_file is not None:
            entry = {"key": entry_key, "variations": result.accepted}
            entry |= {"verified": result.verified, "rejected": result.rejected}
            if sources:  # composed posts: what they were written from, for reading them by hand later
                entry |= {"label": label, "sources": list(sources)}
            with cache_file.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")

    def make(
        items: Sequence[tuple[str, str]],
        current_proba: steps.Proba | None,
        wants: Sequence[int] | None,
        companions: Sequence[Sequence[str]] | None,
    ) -> steps.Generated:
        # Every item is written for k, not its `want`, so strategies and seeds share one cache entry, and
        # steps.generate cuts each to its budget. Rounds stop once `want` are accepted, so the first `want` of a
        # run for k are those a run for `want` would keep (before the consistency filter, which runs after the
        # cache here): the same rewrites, at more LLM time.
        todo = [(text, label) for text, label in items if key(text, label) not in cache]
        generator.predict_proba = None
        if todo:
            batch = generator.generate_many(todo)
            for (text, label), result in zip(todo, batch.results, strict=True):
                if not result.failed:  # a failed item is not cached: a later run may get it
                    remember(key(text, label), result, label)
        # An item whose cached rewrites fall short of its want composes the rest from its class's other labeled
        # texts, as generate() does in a cycle; cached by those texts too (they differ by strategy and seed).
        entries = [[key(text, label)] for text, label in items]
        targets = list(wants) if wants is not None else [generator.config.k] * len(items)
        for i, ((text, label), want) in enumerate(zip(items, targets, strict=True)):
            others = companions[i] if companions is not None else ()
            have = len(cache.get(entries[i][0], [])[:want])
            if not others or entries[i][0] not in cache or have >= want:
                continue
            entries[i].append(compose_key(text, label, others, want - have))
            if entries[i][1] not in cache:
                result = generator.compose(text, label, others, want - have)
                if not result.failed:
                    remember(entries[i][1], result, label, [text, *others])
        threshold = generator.config.consistency_threshold
        kept, dropped, composed = [], 0, 0
        for (_, label), item_keys, want in zip(items, entries, targets, strict=True):
            rewrites = cache.get(item_keys[0], [])
            new_posts = cache.get(item_keys[1], []) if len(item_keys) > 1 else []
            if new_posts:  # the rewrites first, up to the want; the composed posts fill the rest
                rewrites = rewrites[:want]
            offered = rewrites + new_posts
            accepted, n_dropped = (
                consistency_filter(offered, label, current_proba, threshold) if current_proba else (offered, 0)
            )
            kept.append(accepted)
            dropped += n_dropped
            composed += sum(1 for post in accepted if post in new_posts)
        failed = sum(1 for text, label in items if key(text, label) not in cache)
        outcomes = [judged.get(entry_key, (0, 0)) for item_keys in entries for entry_key in item_keys]
        verified, rejected = sum(v for v, _ in outcomes), sum(r for _, r in outcomes)
        return steps.Generated(kept, dropped, failed, verified, rejected, composed)

    return make

"""`guardloop simulate`: the whole active-learning loop with an oracle labeler, to compare query strategies.

Reproduces the paper's setting (Hassan et al. 2024, Tables 3 and 6): start from a small seed set, and per
iteration pick `per_iteration` pool items with a strategy, take their labels from the oracle (the pool file's
own labels play the reviewers), ask the LLM for `variations` label-preserving rewrites of each, retrain, and
measure macro-F1 on a held-out eval set and how balanced the acquired classes are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from guardloop.trainer.base_models import minilm_dir
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.evaluation import report_from_probs
from guardloop.trainer.finetune import FineTuneConfig, TrainingExample, fine_tune, predict_proba
from guardloop.trainer.simulation_results import (
    IterationResult,
    SimulationResult,
    append_result_line,
    class_count_std,
)
from guardloop.trainer.strategies import make_strategy
from guardloop.trainer.variations import VariationGenerator, consistency_filter

from guardloop.core.datafiles import Example
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings

log = logging.getLogger(__name__)

# (labeled items, the current model's predict_proba) -> accepted variations per item
VariationMaker = Callable[[Sequence[tuple[str, str]], Callable[[list[str]], np.ndarray]], list[list[str]]]


def stratified_split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, held_out): `fraction` of every class held out, chosen with `seed`."""
    rng = np.random.default_rng(seed)
    kept: list[Example] = []
    held: list[Example] = []
    for label in LABELS:
        members = [ex for ex in examples if ex.label == label]
        order = rng.permutation(len(members))
        cut = round(fraction * len(members))
        held += [members[i] for i in order[:cut]]
        kept += [members[i] for i in order[cut:]]
    return kept, held


@dataclass
class Simulation:
    pool: Sequence[Example]
    seed_data: Sequence[Example]
    dev: Sequence[Example]
    eval_data: Sequence[Example]
    strategy: str
    iterations: int
    per_iteration: int
    make_variations: VariationMaker | None
    cache_dir: Path
    config: FineTuneConfig
    n_clusters: int | None = None
    progress: bool = False

    def _train(self, examples: Sequence[tuple[str, str]]) -> Any:
        return fine_tune(
            minilm_dir(),
            [TrainingExample(text, label) for text, label in examples],
            [(ex.text, ex.label) for ex in self.dev],
            self.config,
            progress=self.progress,
        )

    def _evaluate(self, result: Any) -> dict[str, Any]:
        texts = [ex.text for ex in self.eval_data]
        return report_from_probs(
            self.eval_data, predict_proba(result.model, result.tokenizer, texts, self.config.max_seq_len)
        )

    def run(self, on_iteration: Callable[[SimulationResult, IterationResult], None] | None = None) -> SimulationResult:
        seed = self.config.seed
        strategy = make_strategy(self.strategy, n_clusters=self.n_clusters)
        embedder = SentenceEmbedder(self.cache_dir)
        pool_texts = [ex.text for ex in self.pool]
        pool_embeddings = embedder.embed(pool_texts)
        available = np.ones(len(self.pool), dtype=bool)

        base = [(ex.text, ex.label) for ex in self.seed_data]
        acquired: list[tuple[str, str]] = []
        variations: list[tuple[str, str]] = []
        model = self._train(base)
        baseline = self._evaluate(model)["macro_f1"]
        log.info("%s seed %d: baseline macro-F1 %.4f", self.strategy, seed, baseline)
        result = SimulationResult(self.strategy, seed, baseline)

        for iteration in range(1, self.iterations + 1):
            started = time.perf_counter()
            candidates = np.flatnonzero(available)
            probs = predict_proba(
                model.model, model.tokenizer, [pool_texts[i] for i in candidates], self.config.max_seq_len
            )
            picked_pool = np.flatnonzero(~available)
            selections = strategy.select(
                pool_embeddings[candidates],
                probs,
                self.per_iteration,
                labeled_embeddings=pool_embeddings[picked_pool] if len(picked_pool) else None,
                random_state=seed * 1000 + iteration,
            )
            chosen = [int(candidates[s.index]) for s in selections]
            available[chosen] = False
            new_items = [(self.pool[i].text, self.pool[i].label) for i in chosen]  # the oracle answers
            acquired += new_items
            accepted = 0
            if self.make_variations is not None:

                def current_proba(texts: list[str], _m: Any = model) -> np.ndarray:
                    return predict_proba(_m.model, _m.tokenizer, texts, self.config.max_seq_len)

                for (_, label), rewrites in zip(new_items, self.make_variations(new_items, current_proba), strict=True):
                    variations += [(text, label) for text in rewrites]
                    accepted += len(rewrites)
            model = self._train(base + acquired + variations)
            report = self._evaluate(model)
            counts = Counter(label for _, label in acquired)
            counts_all = counts + Counter(label for _, label in variations)
            entry = IterationResult(
                iteration=iteration,
                acquired={label: counts.get(label, 0) for label in LABELS},
                acquired_with_variations={label: counts_all.get(label, 0) for label in LABELS},
                std_labels=class_count_std(counts),
                std_with_variations=class_count_std(counts_all),
                variations_accepted=accepted,
                train_size=len(base) + len(acquired) + len(variations),
                eval_macro_f1=report["macro_f1"],
                eval_per_class_f1=report["per_class_f1"],
                seconds=round(time.perf_counter() - started, 1),
            )
            result.iterations.append(entry)
            if on_iteration:
                on_iteration(result, entry)
        return result


def llm_variation_maker(generator: Any, cache_file: Path | None = None) -> VariationMaker:
    """Adapt a started VariationGenerator for simulations.

    The LLM's hygiene-passed rewrites are cached by (label, text, k) in `cache_file`, so strategies and seeds
    that pick the same item reuse them (the LLM is the slow part here); the consistency filter is applied
    afterwards with the model of the current iteration, exactly as in a live cycle.
    """
    cache: dict[str, list[str]] = {}
    if cache_file is not None and cache_file.is_file():
        for line in cache_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                cache[entry["key"]] = entry["variations"]

    def key(text: str, label: str) -> str:
        return hashlib.sha256(f"{label}\x00{generator.config.k}\x00{text}".encode()).hexdigest()

    def make(items: Sequence[tuple[str, str]], current_proba: Callable[[list[str]], np.ndarray]) -> list[list[str]]:
        todo = [(text, label) for text, label in items if key(text, label) not in cache]
        if todo:
            generator.predict_proba = None
            batch = generator.generate_many(todo)
            for (text, label), result in zip(todo, batch.results, strict=True):
                if result.failed:
                    continue  # not cached: a later run may get it
                cache[key(text, label)] = result.accepted
                if cache_file is not None:
                    with cache_file.open("a", encoding="utf-8") as out:
                        out.write(json.dumps({"key": key(text, label), "variations": result.accepted}) + "\n")
        threshold = generator.config.consistency_threshold
        return [
            consistency_filter(cache.get(key(text, label), []), label, current_proba, threshold)[0]
            for text, label in items
        ]

    return make


@dataclass(frozen=True)
class SimulationPlan:
    """What `guardloop simulate` asks for: the data, and every (seed, strategy) run to make on it."""

    pool: Sequence[Example]
    seed_data: Sequence[Example]
    dev: Sequence[Example]
    eval_data: Sequence[Example] | None  # None: hold out `eval_fraction` of the pool, per seed
    eval_fraction: float
    strategies: Sequence[str]
    seeds: Sequence[int]
    iterations: int
    per_iteration: int
    variations: int  # LLM variations per labeled item; 0: none
    clusters: int | None
    epochs: int
    results_file: Path | None = None  # one JSON line per finished iteration (see simulation_results)


def run_simulations(
    plan: SimulationPlan,
    settings: Settings,
    on_iteration: Callable[[str, int, IterationResult], None] | None = None,
) -> list[SimulationResult]:
    """Every (seed, strategy) run of `plan`, one LLM for all of them; each finished iteration is appended to
    `plan.results_file` and reported to `on_iteration(strategy, seed, iteration)` as it ends."""
    settings = settings.model_copy(update={"llm_variations": max(plan.variations, 1)})
    cache_dir = settings.data_dir / "cache"
    results = []
    llm = VariationGenerator.from_settings(settings) if plan.variations else contextlib.nullcontext()
    with llm as generator:
        for seed in plan.seeds:
            pool, held_out = (
                (plan.pool, plan.eval_data) if plan.eval_data else stratified_split(plan.pool, plan.eval_fraction, seed)
            )
            for name in plan.strategies:
                sim = Simulation(
                    pool=pool,
                    seed_data=plan.seed_data,
                    dev=plan.dev,
                    eval_data=held_out,
                    strategy=name,
                    iterations=plan.iterations,
                    per_iteration=plan.per_iteration,
                    make_variations=(
                        llm_variation_maker(generator, cache_dir / "simulation-variations.jsonl") if generator else None
                    ),
                    cache_dir=cache_dir,
                    config=FineTuneConfig(seed=seed, epochs=plan.epochs, patience=2, group_by_length=True),
                    n_clusters=plan.clusters,
                )

                def finished(run: SimulationResult, it: IterationResult, _name: str = name, _seed: int = seed) -> None:
                    if plan.results_file is not None:
                        append_result_line(plan.results_file, _name, _seed, run.baseline_macro_f1, it)
                    if on_iteration is not None:
                        on_iteration(_name, _seed, it)

                results.append(sim.run(on_iteration=finished))
    return results

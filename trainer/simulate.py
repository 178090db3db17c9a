"""`guardloop simulate`: the whole active-learning loop with an oracle labeler, to compare query strategies.

Reproduces the paper's setting (Hassan et al. 2024, Tables 3 and 6): start from a small seed set, and per
iteration pick `per_iteration` pool items with a strategy, take their labels from the oracle (the pool file's
own labels play the reviewers), ask the LLM for `variations` label-preserving rewrites of each, retrain, and
measure macro-F1 on a held-out eval set and how balanced the acquired classes are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from guardloop.trainer.base_models import minilm_dir
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.finetune import FineTuneConfig, TrainingExample, fine_tune, predict_proba
from guardloop.trainer.metrics import classification_report
from guardloop.trainer.strategies import make_strategy

from guardloop.core.datafiles import Example
from guardloop.core.labels import LABELS

log = logging.getLogger(__name__)

# (labeled items, the current model's predict_proba) -> accepted variations per item
VariationMaker = Callable[[Sequence[tuple[str, str]], Callable[[list[str]], np.ndarray]], list[list[str]]]


def class_count_std(counts: dict[str, int]) -> float:
    """Population standard deviation of per-class counts over all six labels (the paper's balance measure)."""
    return float(np.std([counts.get(label, 0) for label in LABELS]))


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
class IterationResult:
    iteration: int
    acquired: dict[str, int]  # human (oracle) labels acquired so far, by class
    acquired_with_variations: dict[str, int]  # plus accepted variations, by class
    std_labels: float
    std_with_variations: float
    variations_accepted: int
    train_size: int
    eval_macro_f1: float
    eval_per_class_f1: dict[str, float]
    seconds: float


@dataclass
class SimulationResult:
    strategy: str
    seed: int
    baseline_macro_f1: float
    iterations: list[IterationResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "baseline_macro_f1": self.baseline_macro_f1,
            "iterations": [it.__dict__ for it in self.iterations],
        }


def append_result_line(path: Path, strategy: str, seed: int, baseline: float, iteration: IterationResult) -> None:
    """One JSON line per finished iteration, flushed at once: a run stopped part-way keeps what it measured."""
    line = {"strategy": strategy, "seed": seed, "baseline_macro_f1": baseline, **iteration.__dict__}
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


RESULT_KEYS = ("strategy", "seed", "iteration", "baseline_macro_f1", "eval_macro_f1", "std_labels", "acquired")


def read_result_lines(path: Path) -> list[dict[str, Any]]:
    """Lines written by `append_result_line`; ValueError naming the line when one is not."""
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        line = json.loads(text)
        missing = [key for key in RESULT_KEYS if not isinstance(line, dict) or key not in line]
        if missing:
            raise ValueError(f"line {number} has no {missing[0]!r}")
        lines.append(line)
    return lines


def summarize(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and iteration: mean and spread over seeds of label std, std with variations, and eval macro-F1.

    Only the iterations every seed of that strategy reached are averaged, so a stopped run never mixes depths.
    """
    by_run: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for line in lines:
        by_run.setdefault((line["strategy"], line["seed"]), {})[line["iteration"]] = line
    rows = []
    for strategy in dict.fromkeys(name for name, _ in by_run):
        runs = [iters for (name, _), iters in by_run.items() if name == strategy]
        for iteration in sorted(set.intersection(*(set(r) for r in runs))):
            at = [r[iteration] for r in runs]
            f1 = np.array([x["eval_macro_f1"] for x in at])
            rows.append(
                {
                    "strategy": strategy,
                    "iteration": iteration,
                    "seeds": sorted(x["seed"] for x in at),
                    "std_labels": float(np.mean([x["std_labels"] for x in at])),
                    "std_with_variations": float(np.mean([x["std_with_variations"] for x in at])),
                    "baseline_macro_f1": float(np.mean([x["baseline_macro_f1"] for x in at])),
                    "eval_macro_f1": float(f1.mean()),
                    "eval_macro_f1_sd": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
                    "acquired": {label: float(np.mean([x["acquired"][label] for x in at])) for label in LABELS},
                }
            )
    return rows


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
        probs = predict_proba(result.model, result.tokenizer, texts, self.config.max_seq_len)
        return classification_report([ex.label for ex in self.eval_data], [LABELS[i] for i in probs.argmax(axis=1)])

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
    from guardloop.trainer.variations import consistency_filter

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

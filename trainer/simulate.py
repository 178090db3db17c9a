"""`guardloop simulate`: the whole active-learning loop with an oracle labeler, to compare query strategies.

Reproduces the paper's setting (Hassan et al. 2024, Tables 3 and 6): start from a small seed set, and per
iteration pick `per_iteration` pool items with a strategy, take their labels from the oracle (the pool file's
own labels play the reviewers), ask the LLM for `variations` label-preserving rewrites of each, retrain, and
measure macro-F1 on a held-out eval set and how balanced the acquired classes are.

It runs the production cycle's own step functions (steps.py): the same embedding, scoring by the served int8
ONNX model, strategy call, oracle labeling, variations with the consistency filter, training-set assembly,
training with export and check, evaluation and gate. Only the pool (in memory), the reviewers (an oracle) and
the registry (none: a promoted candidate simply becomes the model that scores the next iteration) differ.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from guardloop.trainer import steps
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.finetune import FineTuneConfig
from guardloop.trainer.gate import GateRules, rules_from
from guardloop.trainer.labelers import OracleLabeler
from guardloop.trainer.simulation_results import (
    IterationResult,
    SimulationResult,
    append_result_line,
    class_count_std,
)
from guardloop.trainer.simulation_variations import llm_variation_maker
from guardloop.trainer.training_set import split_gold
from guardloop.trainer.variations import VariationGenerator
from guardloop.trainer.variations.companions import companions_for
from guardloop.trainer.variations.verifier import lazy_embedder

from guardloop.core.datafiles import Example, stratified_split
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage.texts import text_hash

log = logging.getLogger(__name__)

__all__ = ["Simulation", "SimulationPlan", "llm_variation_maker", "run_simulations", "stratified_split"]


@dataclass
class Simulation:
    pool: Sequence[Example]
    seed_data: Sequence[Example]
    dev: Sequence[Example]
    eval_data: Sequence[Example]
    strategy: str
    iterations: int
    per_iteration: int
    make_variations: steps.VariationMaker | None
    cache_dir: Path
    config: FineTuneConfig
    n_clusters: int | None = None
    progress: bool = False
    gate_rules: GateRules = field(default_factory=lambda: GateRules(max_f1_drop=0.01, max_recall_drop=0.05))
    gold_share: float = 0.1  # as settings.gold_share: this share of the picks (by pool index) is never trained on
    gold_min_per_class: int = 10  # as settings.gold_min_per_class
    variation_budget: str = "deficit"  # as settings.llm_variation_budget (steps.variation_budgets)
    variations_k: int = 5  # variations asked for per item at most
    compose_examples: int = 3  # as settings.llm_compose_examples: 0, no composing
    label_check: bool = True  # as settings.label_check (and _folds, _max_share below)
    label_check_folds: int = 5
    label_check_max_share: float = 0.2

    def _train_and_evaluate(
        self, examples: Sequence[Example], work_dir: Path, reference_texts: Sequence[str] | None = None
    ) -> tuple[Any, dict[str, Any], list[str]]:
        work_dir.mkdir(parents=True)
        staging, _ = steps.train(
            examples,
            self.dev,
            self.config,
            work_dir,
            fingerprints={},
            cache_dir=self.cache_dir,
            progress=self.progress,
            reference_texts=reference_texts,
        )
        candidate = steps.open_candidate(staging, max_seq_len=self.config.max_seq_len)
        return candidate, *steps.predict(candidate, self.eval_data)

    def _check_labels(
        self,
        embedder: SentenceEmbedder,
        earlier: Sequence[tuple[str, str]],
        labeled: list[tuple[int, str]],
        doubted: list[int],
        oracle: OracleLabeler,
        iteration: int,
    ) -> tuple[list[tuple[int, str]], list[int], int]:
        """The cycle's label check (steps.check_labels) on this iteration's new (pool index, label) pairs, the
        earlier labels as context: doubted ones are withheld and get their second look from the oracle next
        iteration, which settles them (the cycle asks a second reviewer). Returns (labels to use now, doubted
        now, how many)."""
        texts = [ex.text for ex in self.pool]
        second_looks = steps.label(oracle, [text_hash(texts[i]) for i in doubted])
        settled = [(i, label) for i, label in zip(doubted, second_looks, strict=True) if label]
        if not self.label_check or not labeled:
            return settled + labeled, [], 0
        result = steps.check_labels(
            embedder,
            [*self.seed_data, *(Example(text, label) for text, label in earlier)],
            [(texts[i], label) for i, label in labeled],
            [True] * len(labeled),
            random_state=self.config.seed * 1000 + iteration,
            folds=self.label_check_folds,
            max_share=self.label_check_max_share,
        )
        withheld = {s.index for s in result.suspects}
        kept = [pair for k, pair in enumerate(labeled) if k not in withheld]
        return settled + kept, [labeled[k][0] for k in sorted(withheld)], len(withheld)

    def run(self, on_iteration: Callable[[SimulationResult, IterationResult], None] | None = None) -> SimulationResult:
        with tempfile.TemporaryDirectory(prefix="guardloop-simulate-") as tmp:
            return self._run(Path(tmp), on_iteration)

    def _run(
        self, tmp: Path, on_iteration: Callable[[SimulationResult, IterationResult], None] | None
    ) -> SimulationResult:
        seed = self.config.seed
        embedder = SentenceEmbedder(self.cache_dir)
        pool_texts = [ex.text for ex in self.pool]
        pool_hashes = [text_hash(text) for text in pool_texts]
        oracle = OracleLabeler(examples=self.pool)
        pool_embeddings = steps.embed(embedder, pool_texts)
        base_embeddings = steps.embed(embedder, [ex.text for ex in self.seed_data])
        trained_rows: list[int] = []  # pool index of each entry of `trained`, for the labeled embeddings
        available = np.ones(len(self.pool), dtype=bool)

        base = list(self.seed_data)
        acquired: list[tuple[str, str]] = []  # every label the oracle gave; `trained`: those outside the gold reserve
        trained: list[tuple[str, str]] = []
        gold: list[Example] = []
        variations: list[tuple[str, str]] = []
        doubted: list[int] = []  # pool indices whose label the last check doubted: their second look is due
        eval_truth = [ex.label or "" for ex in self.eval_data]
        served, served_report, served_pred = self._train_and_evaluate(base, tmp / "it0")
        baseline = served_report["macro_f1"]
        log.info("%s seed %d: baseline macro-F1 %.4f", self.strategy, seed, baseline)
        result = SimulationResult(self.strategy, seed, baseline)

        for iteration in range(1, self.iterations + 1):
            started = time.perf_counter()
            candidates = np.flatnonzero(available)
            probs = steps.score(served, [pool_texts[i] for i in candidates])
            selections = steps.select(
                self.strategy,
                pool_embeddings[candidates],
                probs,
                self.per_iteration,
                labeled_embeddings=np.concatenate([base_embeddings, pool_embeddings[trained_rows]]),
                labeled_labels=[ex.label or "" for ex in base] + [label for _, label in trained],
                random_state=seed * 1000 + iteration,
                n_clusters=self.n_clusters,
            )
            chosen = [int(candidates[s.index]) for s in selections]
            available[chosen] = False
            answers = steps.label(oracle, [pool_hashes[i] for i in chosen])
            labeled = [(i, label) for i, label in zip(chosen, answers, strict=True) if label]
            acquired += [(pool_texts[i], label) for i, label in labeled]
            labeled, doubted, suspected = self._check_labels(
                embedder, [*trained, *((ex.text, ex.label or "") for ex in gold)], labeled, doubted, oracle, iteration
            )
            # The gold reserve, by pool index as the cycle's is by item id: never trained on, no variations made.
            trainable, reserved = split_gold(labeled, lambda pair: pair[0], self.gold_share)
            gold += [Example(pool_texts[i], label) for i, label in reserved]
            new_items = [(pool_texts[i], label) for i, label in trainable]
            trained_rows += [i for i, _ in trainable]
            trained += new_items
            budgets = steps.variation_budgets(
                self.variation_budget,
                new_items,
                [ex.label or "" for ex in base] + [y for _, y in trained] + [y for _, y in variations],
                self.variations_k,
            )
            companions = companions_for(
                new_items,
                [(ex.text, ex.label or "") for ex in base] + trained,
                self.compose_examples,
                random_state=seed * 1000 + iteration,
            )
            generated = steps.generate(self.make_variations, new_items, served.predict_proba, budgets, companions)
            for (_, label), rewrites in zip(new_items, generated.accepted, strict=True):
                variations += [(text, label) for text in rewrites]
            accepted = sum(len(rewrites) for rewrites in generated.accepted)
            train = steps.build(base, trained, variations)
            candidate, report, predicted = self._train_and_evaluate(
                train, tmp / f"it{iteration}", [ex.text for ex in base] + [text for text, _ in trained]
            )
            fixed = steps.Judged("eval set", eval_truth, report, predicted, served_report, served_pred)
            gold_judged = steps.judge("gold reserve", candidate, served, gold) if gold else None
            judged, note = steps.gate_set(fixed, gold_judged, self.gold_min_per_class)
            decision = steps.gate(judged, self.gate_rules)
            log.info("%s seed %d iteration %d: %s; %s", self.strategy, seed, iteration, decision.reason, note)
            if decision.promote:  # the candidate scores the next iteration's pool, as a promoted model would
                shutil.rmtree(served.model_dir.parent, ignore_errors=True)
                served, served_report, served_pred = candidate, report, predicted
            else:
                shutil.rmtree(candidate.model_dir.parent, ignore_errors=True)
            counts = Counter(label for _, label in acquired)
            counts_all = counts + Counter(label for _, label in variations)
            entry = IterationResult(
                iteration=iteration,
                acquired={label: counts.get(label, 0) for label in LABELS},
                acquired_with_variations={label: counts_all.get(label, 0) for label in LABELS},
                std_labels=class_count_std(counts),
                std_with_variations=class_count_std(counts_all),
                variations_accepted=accepted,
                variations_verified=generated.verified,
                variations_rejected=generated.rejected,
                variations_composed=generated.composed,
                train_size=len(train),
                eval_macro_f1=report["macro_f1"],
                eval_per_class_f1=report["per_class_f1"],
                seconds=round(time.perf_counter() - started, 1),
                promoted=decision.promote,
                labels_suspected=suspected,
            )
            result.iterations.append(entry)
            if on_iteration:
                on_iteration(result, entry)
        return result


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
    variation_budget: str | None = None  # "deficit" or "uniform"; None: settings.llm_variation_budget


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
    # The verifier's drift check embeds with the same sentence embedder the strategies use.
    embed = lazy_embedder(cache_dir) if plan.variations and settings.llm_verify else None
    llm = VariationGenerator.from_settings(settings, embed=embed) if plan.variations else contextlib.nullcontext()
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
                    gate_rules=rules_from(settings),
                    gold_share=settings.gold_share,
                    gold_min_per_class=settings.gold_min_per_class,
                    variation_budget=plan.variation_budget or settings.llm_variation_budget,
                    variations_k=plan.variations,
                    compose_examples=settings.llm_compose_examples,
                    label_check=settings.label_check,
                    label_check_folds=settings.label_check_folds,
                    label_check_max_share=settings.label_check_max_share,
                )

                def finished(run: SimulationResult, it: IterationResult, _name: str = name, _seed: int = seed) -> None:
                    if plan.results_file is not None:
                        append_result_line(plan.results_file, _name, _seed, run.baseline_macro_f1, it)
                    if on_iteration is not None:
                        on_iteration(_name, _seed, it)

                results.append(sim.run(on_iteration=finished))
    return results

"""What each query strategy acquires, selection only: labels per class of the first picks, no LLM, no retraining.

A full `guardloop simulate` at the served epochs takes hours; which classes a strategy acquires does not need the
whole loop. Per seed this splits the pool exactly as `simulate` does (a stratified `--eval-fraction` held out),
trains the bootstrap model on `--seed-data` (the fine-tuned MiniLM with `--dev` for early stopping, as `simulate`
trains it, or a logistic regression on the MiniLM embeddings for a quick look), scores the pool, and lets every
strategy pick `budget` items for each of `--budgets` in one shot, as its first iteration would (random_state
seed * 1000 + 1). The pool file's labels play the oracle. With `--iterations N`, a logistic-regression loop also
runs N rounds of `--per-iteration` picks, retraining on seed + acquired labels each round, so the labeled-count
weighting of `rare-cluster` is seen at work (its eval macro-F1 is the regression's, a proxy only).

    python -m guardloop.bench.acquisition --pool ../shared/data/pool_labeled.tsv \\
        --seed-data ../shared/data/bootstrap_labeled.tsv --dev ../shared/data/dev_labeled.tsv
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from guardloop.core.datafiles import Example, load_examples
from guardloop.core.labels import LABELS
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.simulate import stratified_split
from guardloop.trainer.simulation_results import class_count_std
from guardloop.trainer.strategies import STRATEGIES, make_strategy

RARE = "emergency-situation"
SHORT = {label: label.split("-")[0][:9] for label in LABELS}


def logreg_probs(
    train_emb: np.ndarray, train_labels: Sequence[str], pool_emb: np.ndarray, seed: int
) -> tuple[LogisticRegression, np.ndarray]:
    """Class-weighted logistic regression on sentence embeddings; probabilities in LABELS order."""
    y = np.array([LABELS.index(label) for label in train_labels])
    model = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000, random_state=seed).fit(train_emb, y)
    probs = np.zeros((len(pool_emb), len(LABELS)))
    probs[:, model.classes_] = model.predict_proba(pool_emb)
    return model, probs


def finetuned_probs(
    seed_data: Sequence[Example], dev: Sequence[Example], pool: Sequence[Example], seed: int, epochs: int, cache: Path
) -> np.ndarray:
    """The bootstrap model `simulate` starts from (same config), scored on the pool; cached per seed and epochs."""
    import hashlib

    key = hashlib.sha256("\x00".join(ex.text for ex in pool).encode()).hexdigest()[:16]
    path = cache / f"bootstrap-probs-{seed}-{epochs}-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    # Imported here: torch and transformers take seconds to import, and --model logreg needs neither.
    from guardloop.trainer.base_models import minilm_dir
    from guardloop.trainer.finetune import FineTuneConfig, TrainingExample, fine_tune, predict_proba

    config = FineTuneConfig(seed=seed, epochs=epochs, patience=2, group_by_length=True)
    result = fine_tune(
        minilm_dir(),
        [TrainingExample(ex.text, ex.label) for ex in seed_data],
        [(ex.text, ex.label) for ex in dev],
        config,
    )
    probs = predict_proba(result.model, result.tokenizer, [ex.text for ex in pool], config.max_seq_len)
    np.save(path, probs)
    return probs


def one_shot(
    strategies: Sequence[str],
    budgets: Sequence[int],
    emb: np.ndarray,
    probs: np.ndarray,
    pool: Sequence[Example],
    seed_labels: Sequence[str],
    seed: int,
    seed_emb: np.ndarray,
) -> dict[tuple[str, int], Counter]:
    """Oracle label counts of each strategy's first pick of each budget."""
    counts = {}
    for name in strategies:
        for budget in budgets:
            picks = make_strategy(name).select(
                emb,
                probs,
                budget,
                labeled_embeddings=seed_emb,
                labeled_labels=list(seed_labels),
                random_state=seed * 1000 + 1,
            )
            counts[(name, budget)] = Counter(pool[s.index].label for s in picks)
    return counts


def iterate(
    name: str,
    emb: np.ndarray,
    pool: Sequence[Example],
    seed_emb: np.ndarray,
    seed_labels: Sequence[str],
    eval_emb: np.ndarray,
    eval_labels: Sequence[str],
    iterations: int,
    per_iteration: int,
    seed: int,
) -> tuple[Counter, dict[str, float]]:
    """N rounds of pick, oracle, retrain (logistic regression); acquired counts and eval F1 per class at the end."""
    available = np.ones(len(pool), dtype=bool)
    labels = list(seed_labels)
    train_emb = seed_emb
    strategy = make_strategy(name)
    for iteration in range(1, iterations + 1):
        candidates = np.flatnonzero(available)
        _, probs = logreg_probs(train_emb, labels, emb[candidates], seed)
        picks = strategy.select(
            emb[candidates],
            probs,
            per_iteration,
            labeled_embeddings=train_emb,
            labeled_labels=labels,
            random_state=seed * 1000 + iteration,
        )
        chosen = [int(candidates[s.index]) for s in picks]
        available[chosen] = False
        labels += [pool[i].label for i in chosen]
        train_emb = np.concatenate([train_emb, emb[chosen]])
    model, _ = logreg_probs(train_emb, labels, eval_emb[:1], seed)
    predicted = [LABELS[i] for i in model.predict(eval_emb)]
    per_class = f1_score(eval_labels, predicted, labels=list(LABELS), average=None, zero_division=0)
    f1 = {label: float(v) for label, v in zip(LABELS, per_class, strict=True)}
    f1["macro"] = float(np.mean(per_class))
    return Counter(pool[i].label for i in np.flatnonzero(~available)), f1


def table(title: str, rows: dict[str, list[Counter]], extra: dict[str, list[dict[str, float]]] | None = None) -> str:
    """Mean over seeds per strategy: acquired labels per class, the rare class per seed, class-count std."""
    head = f"| strategy | {' | '.join(SHORT[label] for label in LABELS)} | {SHORT[RARE]} per seed | std |"
    if extra:
        head += " macro-F1 | " + " | ".join(f"F1 {SHORT[label]}" for label in LABELS) + " |"
    lines = [f"\n{title}", head, "|" + " --- |" * (head.count("|") - 1)]
    for name, counters in rows.items():
        mean = [np.mean([c.get(label, 0) for c in counters]) for label in LABELS]
        stds = [class_count_std(dict(c)) for c in counters]
        cells = [f"{m:.1f}" for m in mean] + ["/".join(str(c.get(RARE, 0)) for c in counters), f"{np.mean(stds):.1f}"]
        if extra:
            f1s = extra[name]
            cells.append(f"{100 * np.mean([f['macro'] for f in f1s]):.1f}")
            cells += [f"{100 * np.mean([f[label] for f in f1s]):.1f}" for label in LABELS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True, help="labeled pool; its labels play the oracle")
    parser.add_argument("--seed-data", type=Path, required=True, help="labeled set the bootstrap model learns")
    parser.add_argument("--dev", type=Path, help="dev set for early stopping (needed by --model finetune)")
    parser.add_argument("--model", choices=("finetune", "logreg"), default="finetune")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (10: the served model's)")
    parser.add_argument("--eval-fraction", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--iterations", type=int, default=0, help="also run N logistic-regression rounds")
    parser.add_argument("--per-iteration", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/guardloop-bench-acquisition"))
    args = parser.parse_args(argv)
    if args.model == "finetune" and args.dev is None:
        parser.error("--model finetune needs --dev (early stopping, as simulate trains)")

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    full_pool = load_examples([args.pool]).examples
    seed_data = load_examples([args.seed_data]).examples
    dev = load_examples([args.dev]).examples if args.dev else []
    embedder = SentenceEmbedder(args.cache_dir)
    seed_emb = embedder.embed([ex.text for ex in seed_data])
    seed_labels = [ex.label for ex in seed_data]

    shots: dict[int, dict[str, list[Counter]]] = {b: {n: [] for n in args.strategies} for b in args.budgets}
    looped: dict[str, list[Counter]] = {n: [] for n in args.strategies}
    looped_f1: dict[str, list[dict[str, float]]] = {n: [] for n in args.strategies}
    for seed in args.seeds:
        pool, held = stratified_split(full_pool, args.eval_fraction, seed)
        emb = embedder.embed([ex.text for ex in pool])
        if args.model == "finetune":
            probs = finetuned_probs(seed_data, dev, pool, seed, args.epochs, args.cache_dir)
        else:
            probs = logreg_probs(seed_emb, seed_labels, emb, seed)[1]
        predicted = Counter(LABELS[i] for i in probs.argmax(axis=1))
        print(
            f"seed {seed}: pool {len(pool)} ({Counter(ex.label for ex in pool)[RARE]} {RARE}), "
            f"bootstrap model predicts {dict(predicted)}",
            file=sys.stderr,
            flush=True,
        )
        for (name, budget), counts in one_shot(
            args.strategies, args.budgets, emb, probs, pool, seed_labels, seed, seed_emb
        ).items():
            shots[budget][name].append(counts)
        if args.iterations:
            eval_emb = embedder.embed([ex.text for ex in held])
            for name in args.strategies:
                counts, f1 = iterate(
                    name,
                    emb,
                    pool,
                    seed_emb,
                    seed_labels,
                    eval_emb,
                    [ex.label for ex in held],
                    args.iterations,
                    args.per_iteration,
                    seed,
                )
                looped[name].append(counts)
                looped_f1[name].append(f1)

    model = f"fine-tuned MiniLM, {args.epochs} epochs" if args.model == "finetune" else "logistic regression"
    for budget in args.budgets:
        print(table(f"First selection of {budget} ({model} bootstrap, seeds {args.seeds})", shots[budget]))
    if args.iterations:
        title = (
            f"{args.iterations} x {args.per_iteration} labels, logistic regression retrained each round "
            f"(eval F1 on the held-out {args.eval_fraction:.0%}, seeds {args.seeds})"
        )
        print(table(title, looped, looped_f1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fine-tune a transformer sequence classifier on the six labels, optionally distilling a teacher's soft labels.

Class imbalance: the loss weights each class by (n / (K * count))^power, so the rare class
(emergency-situation) is not drowned out; early stopping keeps the epoch with the best dev macro-F1.
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from guardloop.models.onnx_model import length_ordered_batches
from guardloop.trainer.evaluation import classification_report
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from guardloop.core.labels import LABELS


@dataclass
class FineTuneConfig:
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    patience: int = 3
    max_seq_len: int = 64
    class_weight_power: float = 0.5  # 0 = unweighted, 1 = fully balanced
    distill_alpha: float = 0.5  # weight of the hard-label loss where an example has both
    distill_temperature: float = 2.0
    # The distillation term weighs each text by the class weight of the teacher's top class, as the hard-label
    # loss weighs by the gold class: unweighted, the unlabeled texts (mostly not-harmful) outvote the rare classes.
    distill_class_weighted: bool = False
    seed: int = 13
    # The seed of the data order and dropout; None: `seed`. The head's initialization always follows `seed`, so
    # models that differ only here share their starting point and can be averaged (see `fine_tune_averaged`).
    order_seed: int | None = None
    # ~2x faster on short texts (less padding) but measured 0.4-1.4 macro-F1 points lower on three paired runs,
    # so off for models we serve; `simulate` turns it on, where only strategies are compared.
    group_by_length: bool = False


@dataclass
class TrainingExample:
    text: str
    label: str | None = None  # None: unlabeled, learns from `soft` only
    soft: np.ndarray | None = None  # teacher probabilities in LABELS order


@dataclass
class FineTuneResult:
    model: Any
    tokenizer: Any
    best_epoch: int
    dev_report: dict[str, Any] | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(labels: Sequence[str], power: float) -> torch.Tensor:
    counts = Counter(labels)
    total = len(labels)
    weights = [(total / (len(LABELS) * counts[label])) ** power if counts[label] else 0.0 for label in LABELS]
    return torch.tensor(weights, dtype=torch.float32)


def token_lengths(tokenizer: Any, texts: Sequence[str], max_seq_len: int) -> np.ndarray:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_seq_len)["input_ids"]
    return np.array([len(ids) for ids in encoded], dtype=np.int64)


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, generator: torch.Generator, mega_batches: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar-length texts (as transformers' group_by_length does).

    Padding to the longest text of a random batch made short Reddit-style titles cost ~2.5x their real tokens;
    sorting within random mega-batches of `mega_batches` batches removes most of that while batch
    membership and order stay random. Per-example gradients do not depend on padding.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = batch_size * mega_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@torch.inference_mode()
def predict_proba(
    model: Any, tokenizer: Any, texts: Sequence[str], max_seq_len: int, batch_size: int = 64
) -> np.ndarray:
    """Probabilities in LABELS order, row i for texts[i]; batches are formed by length to spare padding."""
    model.eval()
    out = np.zeros((len(texts), len(LABELS)), dtype=np.float32)
    for rows in length_ordered_batches(texts, batch_size):
        batch = tokenizer(
            [texts[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=max_seq_len,
            return_tensors="pt",
        )
        out[rows] = torch.softmax(model(**batch).logits, dim=-1).numpy()
    return out


def dev_report(model: Any, tokenizer: Any, dev: Sequence[tuple[str, str]], max_seq_len: int) -> dict[str, Any]:
    """The classification report of `model`'s argmax on `dev`, (text, label) pairs."""
    probs = predict_proba(model, tokenizer, [text for text, _ in dev], max_seq_len)
    return classification_report([label for _, label in dev], [LABELS[i] for i in probs.argmax(axis=1)])


def route_library_logs() -> None:
    """transformers and optimum log through handlers of their own, bound to sys.stderr as it was when they first
    logged: a command run in-process twice (a test's CliRunner) got "--- Logging error ---" tracebacks once the
    first run's stream was closed. Their records go to the process's own handlers instead (the CLI's writes to
    the current sys.stderr), in the process's format."""
    from optimum.utils import logging as optimum_logging
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, optimum_logging):
        library.disable_default_handler()
        library.enable_propagation()


def fine_tune(
    base_dir: Path,
    train: Sequence[TrainingExample],
    dev: Sequence[tuple[str, str]] | None,
    config: FineTuneConfig,
    *,
    progress: bool = True,
) -> FineTuneResult:
    """Train from `base_dir` (a local model directory). `dev` is (text, label) pairs for early stopping."""
    route_library_logs()
    started = time.perf_counter()
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    if config.order_seed is not None:
        set_seed(config.order_seed)
    hard_labels = [ex.label for ex in train if ex.label is not None]
    if not hard_labels:
        raise ValueError("no labeled training examples")
    weights = class_weights(hard_labels, config.class_weight_power)

    label_ids = torch.tensor([LABELS.index(ex.label) if ex.label else -1 for ex in train])
    soft = torch.tensor(
        np.stack([ex.soft if ex.soft is not None else np.full(len(LABELS), np.nan) for ex in train]),
        dtype=torch.float32,
    )
    texts = [ex.text for ex in train]
    lengths = token_lengths(tokenizer, texts, config.max_seq_len) if config.group_by_length else np.zeros(0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * steps_per_epoch * config.epochs), steps_per_epoch * config.epochs
    )
    generator = torch.Generator().manual_seed(config.seed if config.order_seed is None else config.order_seed)

    best_state, best_f1, best_epoch, best_report, bad_epochs = None, -1.0, 0, None, 0
    history: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        if config.group_by_length:
            batches = length_grouped_batches(lengths, config.batch_size, generator)
        else:
            order = torch.randperm(len(train), generator=generator).tolist()
            batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        running = 0.0
        for step, idx in enumerate(bar, start=1):
            batch = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=config.max_seq_len,
                return_tensors="pt",
            )
            logits = model(**batch).logits
            loss = _loss(logits, label_ids[idx], soft[idx], weights, config)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            running += loss.item()
            bar.set_postfix(loss=f"{running / step:.3f}")
        entry = {"epoch": epoch, "train_loss": running / max(1, steps_per_epoch)}
        if dev:
            report = dev_report(model, tokenizer, dev, config.max_seq_len)
            entry["dev_macro_f1"] = report["macro_f1"]
            if report["macro_f1"] > best_f1:
                best_f1, best_epoch, best_report, bad_epochs = report["macro_f1"], epoch, report, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
        history.append(entry)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        if dev and bad_epochs >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    model.eval()
    return FineTuneResult(
        model=model,
        tokenizer=tokenizer,
        best_epoch=best_epoch,
        dev_report=best_report,
        history=history,
        seconds=time.perf_counter() - started,
        config=asdict(config),
    )


def _loss(
    logits: torch.Tensor,
    label_ids: torch.Tensor,
    soft: torch.Tensor,
    weights: torch.Tensor,
    config: FineTuneConfig,
) -> torch.Tensor:
    has_label = label_ids >= 0
    has_soft = ~torch.isnan(soft[:, 0])
    total = logits.new_zeros(())
    if has_label.any():
        hard = F.cross_entropy(logits[has_label], label_ids[has_label], weight=weights)
        total = total + (config.distill_alpha if has_soft.any() else 1.0) * hard
    if has_soft.any():
        t = config.distill_temperature
        # Teacher probabilities are sharpened/softened to temperature t (Hinton et al.); t^2 keeps gradient scale.
        teacher = torch.softmax(torch.log(soft[has_soft].clamp_min(1e-8)) / t, dim=-1)
        student = F.log_softmax(logits[has_soft] / t, dim=-1)
        per_text = F.kl_div(student, teacher, reduction="none").sum(dim=-1) * t * t
        if config.distill_class_weighted:
            text_weights = weights[soft[has_soft].argmax(dim=-1)]
            kd = (per_text * text_weights).sum() / text_weights.sum().clamp_min(1e-8)
        else:
            kd = per_text.mean()
        total = total + (1 - config.distill_alpha if has_label.any() else 1.0) * kd
    return total

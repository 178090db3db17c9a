"""`guardloop bench quantization`: fp32, dynamic int8 and static int8 exported from the SAME fine-tuned weights,
compared on one labeled file: macro-F1 one text per call and in served batches, agreement with fp32, how far a
text's scores move with its batch-mates, and speed on one thread.

"dynamic int8, padded batch" is how batches ran before scores were made batch-independent (one session call,
every text padded to the longest, one activation scale for the whole batch); "dynamic int8" is how such a
version is served now (one text per call). Choose calibration settings on a dev file, then measure on a held-out
one: the measuring set must not pick the settings.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardloop.core.datafiles import Example
from guardloop.core.labels import LABELS
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.trainer.evaluation import classification_report
from guardloop.trainer.export import DYNAMIC, STATIC, Calibration, quantize_onnx

BATCH = 32


@dataclass(frozen=True)
class Variant:
    name: str
    model_file: str  # inside the bench's work directory
    legacy_padding: bool = False  # one call per batch padded to its longest text (the behaviour before)


def export_variants(
    checkpoint: Path,
    work_dir: Path,
    calibration_texts: Sequence[str],
    calibrations: dict[str, Calibration],
    max_seq_len: int,
) -> list[Variant]:
    """fp32, dynamic and one static file per calibration, all from `checkpoint` (a save_pretrained directory)."""
    from optimum.exporters.onnx import main_export

    onnx_dir = work_dir / "fp32"
    if not (onnx_dir / "model.onnx").is_file():
        main_export(str(checkpoint), output=onnx_dir, task="text-classification", device="cpu", do_validation=False)
        (onnx_dir / "labels.json").write_text(json.dumps(list(LABELS)), encoding="utf-8")
    variants = [Variant("fp32", "fp32/model.onnx")]
    if not (onnx_dir / "dynamic.onnx").is_file():
        quantize_onnx(onnx_dir, onnx_dir / "dynamic.onnx", DYNAMIC)
    variants += [
        Variant("dynamic int8, padded batch", "fp32/dynamic.onnx", legacy_padding=True),
        Variant("dynamic int8", "fp32/dynamic.onnx"),
    ]
    for name, calibration in calibrations.items():
        out_file = onnx_dir / f"static-{name}.onnx"
        if not out_file.is_file():
            quantize_onnx(
                onnx_dir,
                out_file,
                STATIC,
                calibration_texts=calibration_texts,
                calibration=calibration,
                max_seq_len=max_seq_len,
            )
        variants.append(Variant(f"static int8 {name}", f"fp32/static-{name}.onnx"))
    return variants


def legacy_proba(classifier: OnnxClassifier, texts: list[str]) -> np.ndarray:
    """One session call, every text padded to the longest: the batching that made scores move."""
    encodings = classifier.tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)], mask[row, : len(encoding.ids)] = encoding.ids, 1
    (logits,) = classifier.session.run(
        ["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids}
    )
    logits = logits[:, classifier._reorder]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def measure(
    classifier: OnnxClassifier, proba: Callable[[list[str]], np.ndarray], examples: Sequence[Example], seed: int
) -> dict[str, Any]:
    texts = [ex.text for ex in examples]
    gold = [ex.label for ex in examples]
    single = np.stack([proba([text])[0] for text in texts])
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)  # served batches: whoever arrived together, any lengths
    batched = np.zeros_like(single)
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        batched[rows] = proba([texts[i] for i in rows])
    latencies = []
    for text in texts[:500]:
        started = time.perf_counter()
        proba([text])
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    for start in range(0, len(order), BATCH):
        proba([texts[i] for i in order[start : start + BATCH]])
    throughput = len(texts) / (time.perf_counter() - started)
    return {
        "single": single,
        "macro_f1_single": classification_report(gold, [LABELS[i] for i in single.argmax(1)])["macro_f1"],
        "macro_f1_batched": classification_report(gold, [LABELS[i] for i in batched.argmax(1)])["macro_f1"],
        "max_batch_drift": float(np.abs(batched - single).max()),
        "p50_ms": statistics.median(latencies),
        "p99_ms": float(np.percentile(latencies, 99)),
        "texts_per_s_batch32": throughput,
    }


def run_quantization_bench(
    checkpoint: Path,
    examples: Sequence[Example],
    calibration_texts: Sequence[str],
    work_dir: Path,
    *,
    calibrations: dict[str, Calibration] | None = None,
    max_seq_len: int = 64,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Export the variants, measure each on `examples` (one ONNX thread), print a table; returns its rows."""
    calibrations = calibrations or {"default": Calibration()}
    variants = export_variants(checkpoint, work_dir, calibration_texts, calibrations, max_seq_len)
    tokenizer_dir = work_dir / "fp32"
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    for variant in variants:
        classifier = OnnxClassifier(
            tokenizer_dir,
            version=variant.name,
            threads=1,
            max_seq_len=max_seq_len,
            model_file=Path(variant.model_file).name,
        )
        proba = (lambda t, c=classifier: legacy_proba(c, t)) if variant.legacy_padding else classifier.predict_proba
        result = measure(classifier, proba, examples, seed)
        single = result.pop("single")
        reference = single if reference is None else reference
        result["agreement_with_fp32"] = float((single.argmax(1) == reference.argmax(1)).mean())
        result["size_mb"] = (work_dir / variant.model_file).stat().st_size / 1e6
        rows.append({"variant": variant.name, **result})
    header = f"{'variant':30s} {'F1 1/call':>9s} {'F1 batch':>9s} {'agree fp32':>10s} {'max drift':>10s} "
    header += f"{'p50 ms':>7s} {'p99 ms':>7s} {'texts/s b32':>11s} {'MB':>6s}"
    echo(f"{len(examples)} texts, macro-F1 in %, one ONNX thread, batches of {BATCH} in random order")
    echo(header)
    for row in rows:
        echo(
            f"{row['variant']:30s} {100 * row['macro_f1_single']:9.2f} {100 * row['macro_f1_batched']:9.2f} "
            f"{100 * row['agreement_with_fp32']:9.1f}% {row['max_batch_drift']:10.2g} {row['p50_ms']:7.2f} "
            f"{row['p99_ms']:7.2f} {row['texts_per_s_batch32']:11.0f} {row['size_mb']:6.1f}"
        )
    return rows

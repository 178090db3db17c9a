"""Turn a fine-tuned torch model into a registry-ready directory: ONNX (optimum), int8 quantization, and a check
that the ONNX model agrees with torch before anything is published.

Dynamic int8 stays the default. It computes one activation scale per batch tensor, which moved a text's self-harm
score from 0.369 to 0.484 with its batch-mates; the classifier now runs such a graph one text per call
(models/onnx_model.py), which makes every verdict the text's own at no loss of quality. Static int8 (scales
calibrated here, once, on a seeded sample of the training texts) makes batches safe too, but on the paper's
budget model it scored 72.52 macro-F1 on pool_labeled.tsv against dynamic's 73.18 (fp32 73.80), so it is an
option (`quantization=STATIC`, `guardloop bench quantization`), not the default.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.trainer.evaluation import classification_report
from guardloop.trainer.finetune import FineTuneResult, predict_proba, route_library_logs

from guardloop.core.labels import LABELS

STATIC = "int8-static-per-channel"
DYNAMIC = "int8-dynamic-per-channel"  # served one text per session call: see the module docstring
QUANTIZATION = DYNAMIC


@dataclass(frozen=True)
class Calibration:
    """How static int8 scales are calibrated (chosen on dev_labeled.tsv; see guardloop/bench/quantization.py)."""

    texts: int = 1000  # a seeded sample of the training texts (all of them at the paper's 750-row budget)
    seed: int = 13
    method: str = "MinMax"  # Percentile and Entropy keep every activation: >18 GB for 500 texts here
    moving_average: bool = False


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantization_config(auto: Any) -> Any:
    """Per-channel dynamic int8 (per-tensor lost ~0.8 macro-F1 points on this model).

    With VNNI, signed int8 weights run ~2.7x faster in batches than the AVX2 config's unsigned ones (1,437 vs
    523 texts/s at batch 32 on one core here); without VNNI the AVX2 config avoids u8s8 saturation.
    """
    if cpu_has_vnni():
        return auto.avx512_vnni(is_static=False, per_channel=True)
    return auto.avx2(is_static=False, per_channel=True)


def calibration_sample(texts: Sequence[str], calibration: Calibration) -> list[str]:
    """A seeded sample of the training texts: the activations the served model will mostly see."""
    unique = list(dict.fromkeys(texts))
    if len(unique) <= calibration.texts:
        return unique
    return random.Random(calibration.seed).sample(unique, calibration.texts)


def quantize_static_int8(
    onnx_file: Path,
    out_file: Path,
    tokenizer_file: Path,
    texts: Sequence[str],
    max_seq_len: int,
    calibration: Calibration,
) -> None:
    """QDQ int8 with fixed activation scales: u8 activations, s8 per-channel weights (the VNNI-friendly pair).

    Only MatMuls with a weight matrix are quantized (MatMulConstBOnly): the attention MatMuls (Q.K and
    softmax.V) stay fp32, as dynamic quantization also left them. The MatMuls fed by GELU (each layer's second
    feed-forward MatMul) stay fp32 too: GELU's outliers make one fixed u8 range too coarse for the rest, and
    quantizing them cost ~7 macro-F1 points on dev_labeled.tsv (71.7 vs 78.9; fp32 78.9). Calibration texts run
    unpadded (grouped by length), so pad positions (never read by real tokens) do not stretch the ranges.
    """
    from onnxruntime.quantization import CalibrationDataReader
    from tokenizers import Tokenizer

    if not texts:
        raise ValueError("static int8 needs calibration texts (the training texts)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=max_seq_len)
    tokenizer.no_padding()

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        # Texts of one token length run as one batch (no padding needed): MinMax over them is the same as one by
        # one, and ~10x fewer calibration runs.
        by_length: dict[int, list[Any]] = {}
        for encoding in tokenizer.encode_batch(list(texts)):
            by_length.setdefault(len(encoding.ids), []).append(encoding)
        for encodings in by_length.values():
            yield {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = feeds()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    # quantize_static writes shape-inference scratch files (sym_shape_infer_temp.onnx, *.data) into the working
    # directory: run it from a private one, so a checkout or a service's directory never collects them.
    onnx_file, out_file = Path(onnx_file).resolve(), Path(out_file).resolve()
    with tempfile.TemporaryDirectory(prefix="guardloop-calibrate-") as scratch, contextlib.chdir(scratch):
        _quantize_static(onnx_file, out_file, Reader(), calibration, matmuls_after_gelu(onnx_file))


def _quantize_static(onnx_file: Path, out_file: Path, reader: Any, calibration: Any, excluded: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        onnx_file,
        out_file,
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[calibration.method],
        nodes_to_exclude=excluded,
        extra_options={"MatMulConstBOnly": True, "CalibMovingAverage": calibration.moving_average},
    )


def matmuls_after_gelu(onnx_file: Path) -> list[str]:
    """Names of the MatMuls whose input comes out of a GELU (a Gelu node, or Erf a few ops upstream when the
    exporter decomposed it), found by the graph's structure rather than by layer names."""
    import onnx

    nodes = onnx.load(str(onnx_file), load_external_data=False).graph.node
    producer = {output: node for node in nodes for output in node.output}

    def gelu_upstream(tensor: str, depth: int) -> bool:
        node = producer.get(tensor)
        if node is None or depth == 0 or node.op_type in ("MatMul", "LayerNormalization"):
            return False
        if node.op_type in ("Gelu", "FastGelu", "Erf"):
            return True
        return any(gelu_upstream(name, depth - 1) for name in node.input)

    return [node.name for node in nodes if node.op_type == "MatMul" and gelu_upstream(node.input[0], 4)]


def quantize_onnx(
    onnx_dir: Path,
    out_file: Path,
    quantization: str,
    *,
    calibration_texts: Sequence[str] = (),
    calibration: Calibration | None = None,
    max_seq_len: int = 64,
) -> dict[str, Any]:
    """Quantize `onnx_dir`/model.onnx (fp32, from optimum) into `out_file`; returns what the card records."""
    if quantization not in (STATIC, DYNAMIC):
        raise ValueError(f"unknown quantization {quantization!r}; use {STATIC!r} or {DYNAMIC!r}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if quantization == STATIC:
        calibration = calibration or Calibration()
        sample = calibration_sample(calibration_texts, calibration)
        quantize_static_int8(
            onnx_dir / "model.onnx", out_file, onnx_dir / "tokenizer.json", sample, max_seq_len, calibration
        )
        fp32_matmuls = len(matmuls_after_gelu(onnx_dir / "model.onnx"))
        return {
            "mode": STATIC,
            "calibration": {**asdict(calibration), "texts": len(sample)},
            "fp32_matmuls": fp32_matmuls,
        }
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    with tempfile.TemporaryDirectory(prefix="guardloop-quantize-") as tmp:
        quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name="model.onnx")
        quantizer.quantize(save_dir=Path(tmp), quantization_config=quantization_config(AutoQuantizationConfig))
        shutil.copyfile(Path(tmp, "model_quantized.onnx"), out_file)
    return {"mode": DYNAMIC}


def export_onnx(
    result: FineTuneResult,
    staging_dir: Path,
    *,
    quantize: bool = True,
    quantization: str = QUANTIZATION,
    calibration_texts: Sequence[str] = (),
    calibration: Calibration | None = None,
    max_seq_len: int = 64,
) -> dict[str, Any]:
    """Write model.onnx, tokenizer.json and labels.json into `staging_dir`; returns what the card records.

    `calibration_texts` (the training texts) are sampled for static int8 scales.
    """
    from optimum.exporters.onnx import main_export

    route_library_logs()
    staging_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"mode": None}
    with tempfile.TemporaryDirectory(prefix="guardloop-export-") as tmp:
        hf_dir, onnx_dir = Path(tmp, "hf"), Path(tmp, "onnx")
        result.model.save_pretrained(hf_dir, safe_serialization=True)
        result.tokenizer.save_pretrained(hf_dir)
        main_export(str(hf_dir), output=onnx_dir, task="text-classification", device="cpu", do_validation=False)
        if quantize:
            info = quantize_onnx(
                onnx_dir,
                staging_dir / "model.onnx",
                quantization,
                calibration_texts=calibration_texts,
                calibration=calibration,
                max_seq_len=max_seq_len,
            )
        else:
            shutil.copyfile(onnx_dir / "model.onnx", staging_dir / "model.onnx")
        shutil.copyfile(onnx_dir / "tokenizer.json", staging_dir / "tokenizer.json")
    (staging_dir / "labels.json").write_text(json.dumps(list(LABELS)), encoding="utf-8")
    return info


def onnx_agreement(
    result: FineTuneResult, staging_dir: Path, dev: Sequence[tuple[str, str]], max_seq_len: int
) -> dict[str, Any]:
    """Compare the exported model with torch on `dev`: label agreement, mean probability gap, both macro-F1s."""
    texts = [t for t, _ in dev]
    gold = [y for _, y in dev]
    torch_probs = predict_proba(result.model, result.tokenizer, texts, max_seq_len)
    onnx = OnnxClassifier(staging_dir, version="staging", max_seq_len=max_seq_len, threads=2)
    onnx_probs = onnx.predict_many(texts)
    torch_pred, onnx_pred = torch_probs.argmax(axis=1), onnx_probs.argmax(axis=1)
    return {
        "n": len(texts),
        "agreement": float((torch_pred == onnx_pred).mean()),
        # int8 moves probabilities a little; near-ties then flip labels without the export being wrong.
        "mean_abs_prob_diff": float(np.abs(torch_probs - onnx_probs).mean()),
        "torch_macro_f1": classification_report(gold, [LABELS[i] for i in torch_pred])["macro_f1"],
        "onnx_macro_f1": classification_report(gold, [LABELS[i] for i in onnx_pred])["macro_f1"],
    }

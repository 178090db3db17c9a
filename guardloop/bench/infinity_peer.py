"""Infinity (`infinity-emb`), a dedicated inference server, serving guardloop's own exported ONNX model.

It lives in a virtual environment of its own, outside the repository (its dependencies — transformers, optimum,
its own FastAPI — must never touch the project's pins), created on first use with torch pinned to the CPU build
(an unpinned torch pulls a multi-GB CUDA build). It serves a sequence-classification model through optimum's
ONNX Runtime model and a transformers pipeline, with its own dynamic batching.

Infinity reads a Hugging Face model directory, so the peer gets one built from the published version: its
`model.onnx` (linked, the very same file), its tokenizer, and the student's config with the version's labels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from guardloop.bench.pool import wait_until_ready
from guardloop.core.errors import UserError

INFINITY_VERSION = "0.0.78"
TORCH_VERSION = "2.13.0"  # the project's pin; the CPU wheel
PEER_REQUIREMENTS = (f"torch=={TORCH_VERSION}", f"infinity-emb[server,optimum]=={INFINITY_VERSION}")
DEFAULT_VENV = Path.home() / ".cache" / "guardloop" / "peers" / f"infinity-{INFINITY_VERSION}"
SERVED_NAME = "guardloop"
# The student's files that make a Hugging Face directory of a registry version (the config gets the labels).
HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def ensure_venv(venv: Path, echo) -> Path:
    """The peer's `infinity_emb` command, installing it into `venv` first if it is missing."""
    command = venv / "bin" / "infinity_emb"
    if command.is_file():
        return command
    echo(f"installing the peer into {venv} (its own virtual environment: {' '.join(PEER_REQUIREMENTS)})")
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", *PEER_REQUIREMENTS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"cannot install the peer into {venv} ({last}); install it by hand: {' '.join(step)}")
    return command


def hf_model_dir(version_dir: Path, out_dir: Path) -> Path:
    """A Hugging Face directory around the version's ONNX file, for optimum's ORTModelForSequenceClassification."""
    from guardloop.trainer.base_models import minilm_dir  # the student's config and tokenizer files

    out_dir.mkdir(parents=True, exist_ok=True)
    base = minilm_dir()
    labels = json.loads((version_dir / "labels.json").read_text(encoding="utf-8"))  # the model's column order
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config |= {
        "architectures": ["BertForSequenceClassification"],
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    for name in HF_TOKENIZER_FILES:
        shutil.copyfile(base / name, out_dir / name)
    shutil.copyfile(version_dir / "tokenizer.json", out_dir / "tokenizer.json")
    target = out_dir / "model.onnx"
    target.unlink(missing_ok=True)
    target.symlink_to((version_dir / "model.onnx").resolve())
    return out_dir


@dataclass
class PeerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_infinity(command: Path, model_dir: Path, port: int, *, batch_size: int, log_dir: Path) -> PeerProcess:
    """Start Infinity on loopback with the model, CPU only, offline; returns once /health answers."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GUARDLOOP_", "PYTHON"))}
    env |= {
        "HF_HUB_OFFLINE": "1",  # everything is local; nothing may be fetched
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "DO_NOT_TRACK": "1",
        "HF_HOME": str(log_dir / "hf-home"),  # its optimized-model cache stays in the run's temp dir
    }
    args = [
        str(command),
        "v2",
        "--model-id",
        ".",  # run from inside the directory: given a path, 0.0.78 hands optimum 2.x a path where it wants a name
        "--served-model-name",
        SERVED_NAME,
        "--engine",
        "optimum",
        "--device",
        "cpu",
        "--batch-size",
        str(batch_size),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        # Its warm-up sends texts longer than the model's 512 positions (its pipeline does not truncate) and fails;
        # the benchmark warms every connection itself.
        "--no-model-warmup",
    ]
    log_path = log_dir / "infinity.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, cwd=model_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    peer = PeerProcess(f"http://127.0.0.1:{port}", process, log_path)
    # 300 s: it imports torch and transformers, then loads and warms the model.
    if wait_until_ready(process, f"{peer.url}/health", seconds=300):
        return peer
    if process.poll() is not None:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"the Infinity peer exited ({tail[0]}); see {log_path}")
    peer.stop()
    raise UserError(f"the Infinity peer was not ready within 300 s; see {log_path}")


def request_body(text: str) -> bytes:
    """One text, as Infinity's /classify takes it."""
    return json.dumps({"input": [text], "model": SERVED_NAME}).encode()

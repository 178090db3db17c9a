"""`guardloop bench peer`'s parts that run without the peer: the Hugging Face directory it serves the published ONNX
file from, the raw ONNX figures, memory of a process tree, and the operator errors. The peer itself (Infinity in
its own virtual environment, ~1 GB with torch) is not installed by the tests: the benchmark is run by hand."""

from __future__ import annotations

import json
import os

import pytest

from guardloop.bench.infinity_peer import ensure_venv, hf_model_dir, request_body
from guardloop.bench.peer import raw_onnx, run_peer_bench, tree_rss_mb
from guardloop.core.errors import UserError
from guardloop.core.labels import LABELS
from tests.tiny_onnx import publish_tiny


@pytest.fixture
def published(registry, tmp_path):
    version = publish_tiny(registry, tmp_path)
    return version, registry.path(version)


def test_the_peer_reads_the_very_onnx_file_with_the_versions_labels(published, tmp_path):
    _, version_dir = published
    model_dir = hf_model_dir(version_dir, tmp_path / "peer")
    assert (model_dir / "model.onnx").resolve() == (version_dir / "model.onnx").resolve()
    config = json.loads((model_dir / "config.json").read_text())
    labels = json.loads((version_dir / "labels.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}  # the model's column order
    assert sorted(config["label2id"]) == sorted(LABELS)
    assert (model_dir / "tokenizer.json").read_bytes() == (version_dir / "tokenizer.json").read_bytes()
    hf_model_dir(version_dir, tmp_path / "peer")  # a second run over the same directory replaces, never fails


def test_raw_figures_come_from_real_forward_passes(published):
    version, version_dir = published
    raw = raw_onnx(version_dir, version, ["hello there", "can my landlord keep my deposit?"], 0.2, 128)
    assert raw.forward_p50_ms > 0 and raw.one_thread > 0 and raw.two_threads > 0


def test_memory_of_a_process_tree_includes_this_process():
    assert tree_rss_mb(os.getpid()) > 10


def test_an_installed_peer_is_not_installed_again(tmp_path):
    command = tmp_path / "venv" / "bin" / "infinity_emb"
    command.parent.mkdir(parents=True)
    command.write_text("#!/bin/sh\n")
    assert ensure_venv(tmp_path / "venv", echo=lambda line: pytest.fail(f"installed again: {line}")) == command


def test_the_peer_request_carries_one_text_for_the_served_name():
    assert json.loads(request_body("hi")) == {"input": ["hi"], "model": "guardloop"}


def test_operator_mistakes_are_one_line(settings, registry, tmp_path):
    with pytest.raises(UserError, match="unknown peer"):
        run_peer_bench(
            settings=settings, registry_dir=registry.root, peer="vllm", peer_venv=tmp_path, seconds=2, reference=False
        )
    with pytest.raises(UserError, match="no current model"):
        run_peer_bench(
            settings=settings, registry_dir=registry.root, peer="infinity", peer_venv=tmp_path, seconds=2,
            reference=False,
        )  # fmt: skip

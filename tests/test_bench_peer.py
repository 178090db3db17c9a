"""`guardloop bench peer`'s parts that run without the peer: the Hugging Face directory it serves the published ONNX
file from, the raw ONNX figures, memory of a process tree, and the operator errors. The peer itself (Infinity in
its own virtual environment, ~1 GB with torch) is not installed by the tests: the benchmark is run by hand."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from guardloop.bench.classify import HttpConnection, run_client
from guardloop.bench.infinity_peer import ensure_venv, hf_model_dir, request_body
from guardloop.bench.peer import RawFigures, Server, Tally, raw_onnx, report, run_peer_bench
from guardloop.bench.processes import tree_rss_mb
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


def test_memory_of_a_process_that_is_gone_is_an_error_not_zero():
    # the soak's sampler stops on it; a 0 would have read as all memory freed
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with pytest.raises(ProcessLookupError):
        tree_rss_mb(int(finished.stdout))


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


def test_the_report_sets_each_figure_against_its_target_and_the_models_own_floor():
    """Figures made up for the arithmetic: 300 texts/s served against a raw 500 on two threads is 60%; 32 requests
    in flight at 500 texts/s wait at least 64 ms (Little's law), so a p99 under 60 ms cannot happen there."""
    raw = RawFigures(forward_p50_ms=4.0, one_thread=250, two_threads=500, per_cpu_second=250)
    ours = Server("guardloop", "http://127.0.0.1:1", 1, [], ready_seconds=1.5, latencies_ms=[6.0] * 99 + [12.0])
    ours.served = {32: Tally(3000, 10.0, [100.0] * 100, 15.0, 1.5), 128: Tally(2800, 10.0, [400.0] * 100, 14.0)}
    ours.rss_mb = 190
    lines: list[str] = []
    report(raw, ours, None, None, lines.append)
    text = "\n".join(lines)
    assert "guardloop c=32: 60% of the raw two-thread figure (target >= 75%), p99 100.0 ms (target < 60)" in text
    assert "floor at c=32: mean latency >= 64 ms from the model alone on two threads (no p99 below)" in text
    assert "guardloop c=1: p50 1.50x the raw forward pass (target <= 1.7x)" in text
    assert "guardloop 200; raw ONNX in batches of 32 250 (guardloop / raw: 80%)" in text
    assert "the load generator's own CPU per request at c=32, on the same cores (ms): guardloop 0.50" in text


def test_the_load_generators_client_reads_each_answer_whole_on_one_keep_alive_connection():
    """A real socket server on loopback answers three requests on one connection, with the length header in
    different cases and a body that holds a blank line: each status comes back and no byte is left for the next."""
    answers = [
        b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-a: 1\r\n\r\n{"a":\r\n\r\n1}',
        b'HTTP/1.1 422 Unprocessable Content\r\nContent-Length: 16\r\n\r\n{"detail": "no"}',
        b"HTTP/1.1 503 Service Unavailable\r\nCONTENT-LENGTH:0\r\n\r\n",
    ]
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            received.append(await reader.readexactly(length))
            writer.write(answer)
            await writer.drain()
        writer.close()

    async def client() -> list[int]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, HttpConnection(f"http://127.0.0.1:{port}", {"X-Client-Id": "bench"}) as connection:
            return [await connection.classify(body) for body in (b'{"text":"a"}', b"{}", b'{"text":"\xc3\xa9"}')]

    assert run_client(client()) == [200, 422, 503]
    assert received == [b'{"text":"a"}', b"{}", b'{"text":"\xc3\xa9"}']

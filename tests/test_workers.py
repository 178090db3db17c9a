"""Several worker processes in one `guardloop serve` (GUARDLOOP_WORKERS=2): real processes on one socket, one
SQLite pool, one registry. Both workers answer, both follow a promotion, both write to the pool, and /metrics,
whichever worker renders it, counts every worker's requests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from guardloop.models.registry import ModelRegistry
from guardloop.service.workers import METRICS_DIR_VARIABLE, shared_metrics_dir
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from guardloop.storage import Database, PoolRepository
from tests.conftest import free_port, wait_for
from tests.test_metrics import scrape
from tests.test_scale_out import POLL_SECONDS, SWAP_DEADLINE_SECONDS, stop
from tests.tiny_onnx import publish_tiny

PREDICTION_HELP = "texts classified, by predicted label"


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "guardloop.cli", "serve", "--no-bootstrap", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def per_worker(folder: Path, kind: str, name: str, **labels: str) -> dict[str, float]:
    """One worker's value of a metric per process id, read from that process's own file alone."""
    values: dict[str, float] = {}
    for path in folder.glob(f"{kind}_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        alone = folder.parent / f"alone-{path.name}"
        alone.mkdir(exist_ok=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(alone))
        value = registry.get_sample_value(name, labels or None)
        shutil.rmtree(alone)
        if value is not None:
            values[pid] = value
    return values


def write_stale_count(folder: Path) -> None:
    """A file left by an earlier run's process: 1,000 predictions that this run must not report."""
    stale = MmapedDict(str(folder / "counter_999999.db"))
    key = mmap_key("guardloop_predictions", "guardloop_predictions_total", ["label"], ["legal-advice"], PREDICTION_HELP)
    stale.write_value(key, 1000.0, time.time())
    stale.close()


def ready(server: subprocess.Popen[bytes], url: str, log: Path) -> bool:
    assert server.poll() is None, log.read_text()
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:  # the workers load their models before the socket listens
        return False


def classify_all(url: str, texts: list[str]) -> list[tuple[str, str]]:
    """Each text on a connection of its own, eight at a time: the kernel hands new connections to both workers."""

    def one(text: str) -> tuple[str, str]:
        body = httpx.post(f"{url}/classify", json={"text": text}, timeout=30).json()
        return body["model_version"], body["results"][0]["label"]

    with ThreadPoolExecutor(8) as threads:
        return list(threads.map(one, texts))


def stale_metrics_dir(tmp_path: Path) -> Path:
    """An operator's PROMETHEUS_MULTIPROC_DIR holding a file of an earlier run."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    write_stale_count(metrics_dir)
    return metrics_dir


@pytest.mark.slow
def test_two_workers_answer_follow_a_promotion_pool_and_count_together(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    first = publish_tiny(registry, tmp_path, favour="legal-advice")
    metrics_dir = stale_metrics_dir(tmp_path)
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "GUARDLOOP_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "GUARDLOOP_DATA_DIR": str(data_dir),  # the pool: one SQLite file both workers write to
        "GUARDLOOP_REGISTRY_DIR": str(registry.root),
        "GUARDLOOP_REGISTRY_POLL_SECONDS": str(POLL_SECONDS),
        "GUARDLOOP_POOL_SAMPLE_RATE": "1.0",  # every classified text is pooled
        "GUARDLOOP_POOL_FLUSH_SECONDS": "0.1",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    server = start_server(env, port, log)
    try:

        def both_loaded(version: str) -> bool:
            assert server.poll() is None, log.read_text()
            served = per_worker(metrics_dir, "gauge_livemax", "guardloop_model_info", version=version)
            return len(served) == 2 and set(served.values()) == {1.0}

        assert wait_for(lambda: both_loaded(first) and ready(server, url, log), timeout=90), log.read_text()
        # the stale file of an earlier run is gone; these two workers' files are what /metrics reads
        assert not (metrics_dir / "counter_999999.db").exists()

        texts = [f"worker test, first model, {i}" for i in range(60)]
        assert classify_all(url, texts) == [(first, "legal-advice")] * 60
        handled = per_worker(metrics_dir, "counter", "guardloop_predictions_total", label="legal-advice")
        assert len(handled) == 2 and all(count > 0 for count in handled.values()), handled  # both workers answered
        assert sum(handled.values()) == 60
        assert scrape(url).value("guardloop_predictions_total", label="legal-advice") == 60  # summed, nothing stale

        # ---- a promotion reaches both workers by their own polls
        second = publish_tiny(registry, tmp_path, favour="self-harm", make_current=False)
        registry.promote(second)
        assert wait_for(lambda: both_loaded(second), timeout=SWAP_DEADLINE_SECONDS), log.read_text()
        later = [f"worker test, second model, {i}" for i in range(40)]
        assert classify_all(url, later) == [(second, "self-harm")] * 40
        metrics = scrape(url)
        assert metrics.series("guardloop_model_info") == {
            frozenset({("version", first)}): 0.0,  # zeroed by both workers: a removed series' file keeps its 0
            frozenset({("version", second)}): 1.0,
        }
        assert metrics.value("guardloop_model_swaps_total") == 2  # one swap in each worker
        assert metrics.value("guardloop_model_loaded") == 1
        assert "guardloop_cycles" not in metrics.types  # the trainer's metrics are in the files, not exported

        # ---- both workers' pool items land in the one SQLite file
        database = Database(f"sqlite:///{data_dir / 'guardloop.db'}")

        def pooled() -> dict[str, str]:
            return {item.text: item.model_version for item in PoolRepository(database).iter_items()}

        expected = {text: first for text in texts} | {text: second for text in later}
        assert wait_for(lambda: expected.items() <= pooled().items(), timeout=20)
        assert wait_for(lambda: scrape(url).value("guardloop_pool_writes_total") == 100, timeout=20)
        database.dispose()
    finally:
        stop(server)
    assert server.returncode == 0, log.read_text()


def test_the_metrics_folder_is_temporary_when_the_operator_names_none(tmp_path, monkeypatch):
    # In process: what `serve` does around the workers (the subprocess test above covers an operator's folder).
    monkeypatch.delenv(METRICS_DIR_VARIABLE, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        with shared_metrics_dir() as folder:
            assert os.environ[METRICS_DIR_VARIABLE] == str(folder)  # what the spawned workers inherit
            assert folder.parent == tmp_path and folder.name.startswith("guardloop-metrics-")
            (folder / "counter_1.db").write_bytes(b"")  # a worker's file
        assert METRICS_DIR_VARIABLE not in os.environ
        assert not folder.exists()
    finally:
        tempfile.tempdir = None


@pytest.mark.slow
def test_one_worker_under_an_operators_metrics_folder_reports_only_its_own_counts(tmp_path):
    # PROMETHEUS_MULTIPROC_DIR set for the whole pod, GUARDLOOP_WORKERS left at 1: an earlier run's file is dropped.
    registry = ModelRegistry(tmp_path / "registry")
    version = publish_tiny(registry, tmp_path, favour="legal-advice")
    metrics_dir = stale_metrics_dir(tmp_path)
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "GUARDLOOP_DATA_DIR": str(tmp_path / "data"),
        "GUARDLOOP_REGISTRY_DIR": str(registry.root),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    server = start_server(env, port, log)
    try:
        assert wait_for(lambda: ready(server, url, log), timeout=90), log.read_text()
        assert classify_all(url, [f"one worker {i}" for i in range(10)]) == [(version, "legal-advice")] * 10
        metrics = scrape(url)
        assert metrics.value("guardloop_predictions_total", label="legal-advice") == 10
        assert metrics.value("guardloop_model_loaded") == 1
        assert not (metrics_dir / "counter_999999.db").exists()
    finally:
        stop(server)

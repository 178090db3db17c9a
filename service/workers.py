"""Several worker processes in one pod (`GUARDLOOP_WORKERS`): uvicorn starts them on one shared listening socket.

Why: the event loop and the inference threads of one process share one GIL, so one process leaves part of a core
idle under load (README, "Quality and speed"); two processes each have their own.

Each worker is a whole service: its own ONNX session, micro-batcher, pool writer and registry watcher. What they
share, and how it stays correct:
- the model: every worker follows the registry's `current` on its own poll, as replicas do, so a promotion
  reaches all of them within `registry_poll_seconds`; a request is answered by one worker's one version;
- the pool and review queue: the database (SQLite in WAL mode, or PostgreSQL). `serve` applies the migrations
  once before the workers start, so they never race to create the tables;
- roll-out tallies: one row per process (service/rollout_monitor.py), summed across processes and replicas;
- /metrics: prometheus-client's multiprocess mode. Every value lives in a file per process under
  PROMETHEUS_MULTIPROC_DIR, and whichever worker answers /metrics reads them all (core/telemetry.py says how
  each gauge combines). `serve` sets that folder (a fresh temporary one unless the operator names one) before
  the workers start, since prometheus-client reads it when it is first imported.
Each worker builds its app with `create_worker_app` (service/app.py) from the same environment the parent checked.
Per worker, as per replica: the rate-limit buckets (a client whose connections land on both workers gets up to
twice its limit) and the admission queue.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Metric, multiprocess
from prometheus_client.registry import Collector

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def shared_metrics_dir() -> Iterator[Path]:
    """The folder the workers' metric files go to, for as long as they run.

    An operator's PROMETHEUS_MULTIPROC_DIR (an emptyDir, say) is kept, but every file in it is removed: an earlier
    run's counts would be summed into this run's, and this process's own files (it imported the metrics with the
    folder set, and serves nothing) would hold `model_loaded` at 0 for the whole pod.
    """
    given = os.environ.get(METRICS_DIR_VARIABLE)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        remove_metric_files(folder)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="guardloop-metrics-"))
    os.environ[METRICS_DIR_VARIABLE] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(METRICS_DIR_VARIABLE, None)
        shutil.rmtree(folder, ignore_errors=True)


class _EveryWorker(Collector):
    """Every worker's values of the metrics this process exposes. The files can also hold the trainer's metrics,
    made at 0 wherever core/trainer_telemetry.py is imported (the CLI's trainer commands import it); a service that
    exported those would read as a trainer at 0."""

    def __init__(self, folder: str) -> None:
        self._files = multiprocess.MultiProcessCollector(None, folder)

    def collect(self) -> Iterable[Metric]:
        exposed = {family.name for family in REGISTRY.collect()}
        return [family for family in self._files.collect() if family.name in exposed]


def remove_metric_files(folder: Path, *, keep_pid: int | None = None) -> None:
    """Remove the metric files in `folder`, but those of process `keep_pid` (one serving from them already)."""
    for path in folder.glob("*.db"):
        if keep_pid is None or not path.stem.endswith(f"_{keep_pid}"):
            path.unlink(missing_ok=True)


def forget_earlier_processes() -> None:
    """A single serving process under an operator's PROMETHEUS_MULTIPROC_DIR: its own files were made when the
    metrics were imported; an earlier run's would be summed into its /metrics."""
    if folder := os.environ.get(METRICS_DIR_VARIABLE):
        remove_metric_files(Path(folder), keep_pid=os.getpid())


def metrics_registry() -> CollectorRegistry:
    """What /metrics renders: this process's registry, or every worker's files in multiprocess mode."""
    folder = os.environ.get(METRICS_DIR_VARIABLE)
    if not folder:
        return REGISTRY
    registry = CollectorRegistry()
    registry.register(_EveryWorker(folder))
    return registry


def forget_this_process() -> None:
    """On a worker's way out: its live gauges (model loaded, version served) stop counting. A worker that is
    killed cannot do this, and its last values stay until the pod restarts."""
    if os.environ.get(METRICS_DIR_VARIABLE):
        multiprocess.mark_process_dead(os.getpid())

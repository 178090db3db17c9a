"""`guardloop bench peer`: guardloop's /classify beside a dedicated inference server on the same model and cores.

One run, one phase at a time on the same machine (nothing else of the benchmark's runs meanwhile):

    raw ONNX     the published model in this process: one text's forward pass with tokenization (p50), and
                 texts/s in batches of 32 on one thread and on two (the ceiling of the cores)
    guardloop    `guardloop serve --no-bootstrap` on loopback with pool logging and metrics on (the per-client
                 limits raised so that one load generator is not refused): its cold start (process start to
                 /readyz 200), p50/p99 at concurrency 1, texts/s and p99 at concurrency 32 and 128, RSS
    the peer     Infinity serving the same ONNX file (guardloop/bench/infinity_peer.py), the same figures
    reference    optional: the transformers pipeline on torch (`guardloop bench classify`'s reference)

Every request carries one text. The load generator is this process (raw sockets, keep-alive, closed loop) and
shares the cores with the server, as every benchmark here does; ratios from one run are the figures to compare.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from guardloop.bench.classify import HttpConnection, bench_texts, percentile
from guardloop.bench.infinity_peer import ensure_venv, hf_model_dir, request_body, start_infinity
from guardloop.bench.pool import free_port, start_service
from guardloop.core.errors import UserError
from guardloop.core.settings import Settings
from guardloop.models.registry import ModelRegistry

CONCURRENCIES = (32, 128)
BATCH = 32  # texts per batch of the raw figures (the service's largest batch)


@dataclass
class ServerFigures:
    name: str
    p50_ms: float  # concurrency 1
    p99_ms: float
    texts_per_second: dict[int, float]  # by concurrency
    p99_loaded_ms: dict[int, float]  # p99 at that concurrency
    rss_mb: float
    ready_seconds: float | None = None  # process start to ready


@dataclass
class RawFigures:
    forward_p50_ms: float  # one text, tokenization included
    one_thread: float  # texts/s, batches of BATCH
    two_threads: float


# ----------------------------------------------------------------------------- the model alone
def raw_onnx(version_dir: Path, version: str, texts: list[str], seconds: float, max_seq_len: int) -> RawFigures:
    from guardloop.models.onnx_model import OnnxClassifier

    classifier = OnnxClassifier(version_dir, version=version, threads=1, max_seq_len=max_seq_len)
    classifier.warm_up()
    timings = []
    stop = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < stop:
        started = time.perf_counter()
        classifier.predict_proba([texts[i % len(texts)]])
        timings.append((time.perf_counter() - started) * 1000)
        i += 1
    batches = [[texts[(k * BATCH + j) % len(texts)] for j in range(BATCH)] for k in range(len(texts))]

    def batched(threads: int) -> float:
        done = [0] * threads
        deadline = time.perf_counter() + seconds

        def run(slot: int) -> None:
            k = slot
            while time.perf_counter() < deadline:
                classifier.predict_proba(batches[k % len(batches)])  # ONNX Runtime releases the GIL while it runs
                done[slot] += BATCH
                k += threads

        started = time.perf_counter()
        workers = [threading.Thread(target=run, args=(slot,)) for slot in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(done) / (time.perf_counter() - started)

    return RawFigures(percentile(timings, 50), batched(1), batched(2))


# ----------------------------------------------------------------------------- a server under load
async def _latency(url: str, bodies: list[bytes], seconds: float) -> list[float]:
    timings = []
    async with HttpConnection(url, {}) as connection:
        for body in bodies[:20]:  # warm the connection and the server's caches
            await connection.classify(body)
        stop = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status = await connection.classify(bodies[i % len(bodies)])
            timings.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise UserError(f"{url}/classify answered {status} at concurrency 1")
            i += 1
    return timings


async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> tuple[float, float]:
    """Closed loop, `concurrency` keep-alive connections, for `seconds`: texts/s and p99 (ms)."""
    timings: list[float] = []
    failures = 0
    ready = asyncio.Event()
    stop = 0.0

    async def worker(slot: int) -> None:
        nonlocal failures
        async with HttpConnection(url, {}) as connection:
            await connection.classify(bodies[slot % len(bodies)])
            await ready.wait()
            i = slot
            while time.perf_counter() < stop:
                started = time.perf_counter()
                failures += await connection.classify(bodies[i % len(bodies)]) != 200
                timings.append((time.perf_counter() - started) * 1000)
                i += concurrency

    tasks = [asyncio.create_task(worker(slot)) for slot in range(concurrency)]
    await asyncio.sleep(0.5)  # every connection open and warm
    started = time.perf_counter()
    stop = started + seconds
    ready.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    if failures:
        raise UserError(f"{failures} of {len(timings)} requests to {url}/classify failed at concurrency {concurrency}")
    return len(timings) / elapsed, percentile(timings, 99)


def measure_server(name: str, url: str, pid: int, bodies: list[bytes], seconds: float, echo) -> ServerFigures:
    lat = asyncio.run(_latency(url, bodies, seconds))
    echo(f"  {name}: c=1 p50 {percentile(lat, 50):.2f} ms ({len(lat)} requests)")
    rates, p99s = {}, {}
    for concurrency in CONCURRENCIES:
        rates[concurrency], p99s[concurrency] = asyncio.run(_load(url, bodies, concurrency, seconds))
        echo(f"  {name}: c={concurrency} {rates[concurrency]:.0f} texts/s, p99 {p99s[concurrency]:.1f} ms")
    return ServerFigures(name, percentile(lat, 50), percentile(lat, 99), rates, p99s, tree_rss_mb(pid))


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (a server may fork workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


# ----------------------------------------------------------------------------- the run
def run_peer_bench(
    *,
    settings: Settings,
    registry_dir: Path,
    peer: str,
    peer_venv: Path,
    seconds: float,
    reference: bool,
    echo: Callable[[str], None] = typer.echo,
) -> None:
    if peer != "infinity":
        raise UserError(f"--peer {peer}: unknown peer; the one measured here is infinity")
    registry = ModelRegistry(registry_dir)
    version = registry.current()
    if version is None:
        raise UserError(f"no current model in {registry_dir}; train one (guardloop train) or pass --registry-dir")
    version_dir = registry.path(version)
    command = ensure_venv(peer_venv, echo)  # before any measurement: an install must not overlap one
    texts = bench_texts()
    echo(f"model {version}; {seconds:.0f} s per phase; the load generator shares the cores")

    raw = raw_onnx(version_dir, version, texts, seconds, settings.max_seq_len)
    echo(f"  raw ONNX: one text {raw.forward_p50_ms:.2f} ms; {raw.one_thread:.0f} / {raw.two_threads:.0f} texts/s")

    with tempfile.TemporaryDirectory(prefix="guardloop-bench-peer-") as tmp_name:
        tmp = Path(tmp_name)
        limits_off = {  # one load generator at full speed is one client: its limits would measure themselves
            "GUARDLOOP_RATE_LIMIT_CLASSIFY_PER_IP": "1000000/second",
            "GUARDLOOP_RATE_LIMIT_CLASSIFY_PER_KEY": "1000000/second",
            "GUARDLOOP_RATE_LIMIT_CLASSIFY_TOKENS_PER_CLIENT": "",
        }
        started = time.perf_counter()
        service = start_service(
            "guardloop",
            settings=settings,
            registry_dir=registry_dir,
            data_dir=tmp / "guardloop",
            database_url=None,  # pool logging on, to a fresh SQLite file
            pool=True,
            admin_token="bench",
            extra_env=limits_off,
        )
        ready = time.perf_counter() - started
        try:
            ours = measure_server(
                "guardloop", service.url, service.process.pid, _guardloop_bodies(texts), seconds, echo
            )
            ours.ready_seconds = ready
        finally:
            service.stop()

        model_dir = hf_model_dir(version_dir, tmp / "peer-model")
        started = time.perf_counter()
        process = start_infinity(command, model_dir, free_port(), batch_size=BATCH, log_dir=tmp)
        peer_ready = time.perf_counter() - started
        try:
            theirs = measure_server("infinity", process.url, process.process.pid, _peer_bodies(texts), seconds, echo)
            theirs.ready_seconds = peer_ready
        finally:
            process.stop()

    ref = None
    if reference:
        from guardloop.bench.classify import pipeline_reference

        ref_lat, _ = pipeline_reference(texts, 300)
        ref = (percentile(ref_lat, 50), percentile(ref_lat, 99), 1000 / statistics.mean(ref_lat))
    report(raw, ours, theirs, ref, echo)


def _guardloop_bodies(texts: list[str]) -> list[bytes]:
    return [json.dumps({"text": text}).encode() for text in texts]


def _peer_bodies(texts: list[str]) -> list[bytes]:
    return [request_body(text) for text in texts]


def report(
    raw: RawFigures,
    ours: ServerFigures,
    theirs: ServerFigures,
    ref: tuple[float, float, float] | None,
    echo: Callable[[str], None],
) -> None:
    c_lo, c_hi = CONCURRENCIES
    echo("")
    echo(
        f"{'':<30}{'p50 ms':>8}{'p99 ms':>8}{'texts/s':>9}{'p99 ms':>8}{'texts/s':>9}{'p99 ms':>8}"
        f"{'RSS MB':>8}{'ready s':>8}"
    )
    echo(f"{'':<30}{'(c=1)':>8}{'(c=1)':>8}{f'(c={c_lo})':>9}{f'(c={c_lo})':>8}{f'(c={c_hi})':>9}{f'(c={c_hi})':>8}")
    for row in (ours, theirs):
        echo(
            f"{row.name:<30}{row.p50_ms:>8.2f}{row.p99_ms:>8.2f}{row.texts_per_second[c_lo]:>9.0f}"
            f"{row.p99_loaded_ms[c_lo]:>8.1f}{row.texts_per_second[c_hi]:>9.0f}{row.p99_loaded_ms[c_hi]:>8.1f}"
            f"{row.rss_mb:>8.0f}{row.ready_seconds or 0:>8.1f}"
        )
    echo(f"{'raw ONNX, in process':<30}{raw.forward_p50_ms:>8.2f}{'':>8}{raw.two_threads:>9.0f}  (2 threads)")
    if ref is not None:
        echo(f"{'transformers pipeline (torch)':<30}{ref[0]:>8.2f}{ref[1]:>8.2f}{ref[2]:>9.0f}  (one call per text)")
    echo("")
    echo(
        f"raw ONNX: one text {raw.forward_p50_ms:.2f} ms; batches of {BATCH}: {raw.one_thread:.0f} texts/s on one "
        f"thread, {raw.two_threads:.0f} on two"
    )
    share = ours.texts_per_second[c_lo] / raw.two_threads
    echo(
        f"guardloop c={c_lo}: {share:.0%} of the raw two-thread figure (target >= 75%), "
        f"p99 {ours.p99_loaded_ms[c_lo]:.1f} ms (target < 60)"
    )
    echo(f"guardloop c=1: p50 {ours.p50_ms / raw.forward_p50_ms:.2f}x the raw forward pass (target <= 1.7x)")
    echo(
        f"guardloop / infinity: texts/s {ours.texts_per_second[c_lo] / theirs.texts_per_second[c_lo]:.2f}x at "
        f"c={c_lo}, {ours.texts_per_second[c_hi] / theirs.texts_per_second[c_hi]:.2f}x at c={c_hi}; "
        f"p50 at c=1 {ours.p50_ms / theirs.p50_ms:.2f}x (lower is better); RSS {ours.rss_mb / theirs.rss_mb:.2f}x"
    )
    if ours.ready_seconds is not None:
        echo(f"guardloop cold start (process start to /readyz 200, ~0.2 s resolution): {ours.ready_seconds:.1f} s")

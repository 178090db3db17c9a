"""`guardloop bench peer`: guardloop's /classify beside a dedicated inference server on the same model and cores.

Both servers run on loopback on the same machine, each its own process, started one after the other (their cold
start: process start to ready):

    guardloop    `guardloop serve --no-bootstrap` with the registry's current model, pool logging (a fresh SQLite
                 file) and metrics on; the per-client limits raised so that one load generator is not refused
    the peer     Infinity serving the very same ONNX file (guardloop/bench/infinity_peer.py)
    raw ONNX     the same model in this process: one text's forward pass with tokenization, and texts/s in
                 batches of 32 on one thread and on two (what the cores can compute)
    reference    optional: the transformers pipeline on torch (`guardloop bench classify`'s reference)

Every figure is taken in turns of SLICE_SECONDS, the contestants alternating, so that on a machine shared with
other jobs both sides of a ratio see the same load: p50/p99 at concurrency 1 (beside the raw forward pass),
texts/s and p99 at concurrency 32 (beside the raw batched figures) and 128, then each server's RSS. Every request
carries one text. The load generator is this process (raw sockets, keep-alive, closed loop) and shares the cores.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import typer

from guardloop.bench.classify import HttpConnection, bench_texts, percentile, run_client
from guardloop.bench.infinity_peer import ensure_venv, hf_model_dir, request_body, start_infinity
from guardloop.bench.pool import free_port, start_service
from guardloop.bench.processes import tree_cpu_seconds, tree_rss_mb
from guardloop.core.errors import UserError
from guardloop.core.settings import Settings
from guardloop.models.registry import ModelRegistry

CONCURRENCIES = (32, 128)
BATCH = 32  # texts per batch of the raw figures (the service's largest batch)
SLICE_SECONDS = 2.0  # one turn of one contestant


@dataclass
class RawFigures:
    forward_p50_ms: float  # one text, tokenization included
    one_thread: float  # texts/s, batches of BATCH
    two_threads: float
    per_cpu_second: float  # texts per CPU-second of the two threads


@dataclass
class Server:
    """A server under test, and what was measured of it."""

    name: str
    url: str
    pid: int
    bodies: list[bytes]  # one text each, in the server's request format
    ready_seconds: float  # process start to ready
    latencies_ms: list[float] = field(default_factory=list)  # concurrency 1
    served: dict[int, Tally] = field(default_factory=dict)  # by concurrency
    rss_mb: float = 0.0


@dataclass
class Tally:
    texts: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the server's (or the raw threads') CPU time: a machine others load inflates less
    generator_cpu_seconds: float = 0.0  # the load generator's (this process): what it took from the server's cores

    def add(
        self,
        texts: int,
        seconds: float,
        latencies_ms: list[float],
        cpu_seconds: float = 0.0,
        generator_cpu_seconds: float = 0.0,
    ) -> None:
        self.texts += texts
        self.seconds += seconds
        self.latencies_ms += latencies_ms
        self.cpu_seconds += cpu_seconds
        self.generator_cpu_seconds += generator_cpu_seconds

    @property
    def per_cpu_second(self) -> float:
        return self.texts / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def rate(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------- the model alone
class RawModel:
    """The published model in this process, on one ONNX Runtime thread per caller (as the service runs it)."""

    def __init__(self, version_dir: Path, version: str, texts: list[str], max_seq_len: int) -> None:
        from guardloop.models.onnx_model import OnnxClassifier

        self.classifier = OnnxClassifier(version_dir, version=version, threads=1, max_seq_len=max_seq_len)
        self.classifier.warm_up()
        self.texts = texts
        self.batches = [[texts[(k * BATCH + j) % len(texts)] for j in range(BATCH)] for k in range(len(texts))]
        self.forward_ms: list[float] = []
        self.batched = {1: Tally(), 2: Tally()}  # by threads

    def one_text(self, seconds: float) -> None:
        stop = time.perf_counter() + seconds
        i = len(self.forward_ms)
        while time.perf_counter() < stop:
            started = time.perf_counter()
            self.classifier.predict_proba([self.texts[i % len(self.texts)]])
            self.forward_ms.append((time.perf_counter() - started) * 1000)
            i += 1

    def in_batches(self, threads: int, seconds: float) -> None:
        done = [0] * threads
        deadline = time.perf_counter() + seconds

        def run(slot: int) -> None:
            k = slot
            while time.perf_counter() < deadline:
                self.classifier.predict_proba(self.batches[k % len(self.batches)])  # ONNX Runtime releases the GIL
                done[slot] += BATCH
                k += threads

        started, cpu = time.perf_counter(), time.process_time()  # only these threads work in this process now
        workers = [threading.Thread(target=run, args=(slot,)) for slot in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self.batched[threads].add(sum(done), time.perf_counter() - started, [], time.process_time() - cpu)

    def figures(self) -> RawFigures:
        two = self.batched[2]
        return RawFigures(percentile(self.forward_ms, 50), self.batched[1].rate, two.rate, two.per_cpu_second)


def raw_onnx(version_dir: Path, version: str, texts: list[str], seconds: float, max_seq_len: int) -> RawFigures:
    raw = RawModel(version_dir, version, texts, max_seq_len)
    raw.one_text(seconds)
    raw.in_batches(1, seconds)
    raw.in_batches(2, seconds)
    return raw.figures()


# ----------------------------------------------------------------------------- a server under load
async def _latency(url: str, bodies: list[bytes], seconds: float) -> list[float]:
    timings = []
    async with HttpConnection(url, {}) as connection:
        for body in bodies[:5]:  # warm the connection
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


async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> tuple[int, float, list[float]]:
    """Closed loop, `concurrency` keep-alive connections, for `seconds`: texts answered, seconds, latencies (ms)."""
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
    await asyncio.sleep(0.3)  # every connection open and warm
    started = time.perf_counter()
    stop = started + seconds
    ready.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    if failures:
        raise UserError(f"{failures} of {len(timings)} requests to {url}/classify failed at concurrency {concurrency}")
    return len(timings), elapsed, timings


def measure(raw: RawModel, servers: list[Server], seconds: float, echo: Callable[[str], None]) -> None:
    """Every figure in slices of SLICE_SECONDS, the contestants taking turns within each round: on a machine that
    others share, each side of a ratio then sees the same load (a whole phase after another would not)."""
    rounds = max(1, round(seconds / SLICE_SECONDS))
    part = seconds / rounds
    for _ in range(rounds):
        raw.one_text(part)
        for server in servers:
            server.latencies_ms += run_client(_latency(server.url, server.bodies, part))
    echo("  c=1: " + ", ".join(f"{s.name} p50 {percentile(s.latencies_ms, 50):.2f} ms" for s in servers))
    for concurrency in CONCURRENCIES:
        for _ in range(rounds):
            if concurrency == CONCURRENCIES[0]:
                raw.in_batches(1, part)
                raw.in_batches(2, part)
            for server in servers:
                cpu, generator_cpu = tree_cpu_seconds(server.pid), time.process_time()
                texts, elapsed, latencies = run_client(_load(server.url, server.bodies, concurrency, part))
                server.served.setdefault(concurrency, Tally()).add(
                    texts, elapsed, latencies, tree_cpu_seconds(server.pid) - cpu, time.process_time() - generator_cpu
                )
        echo(f"  c={concurrency}: " + ", ".join(f"{s.name} {s.served[concurrency].rate:.0f} texts/s" for s in servers))
    for server in servers:
        server.rss_mb = tree_rss_mb(server.pid)


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
    # Before any measurement (an install must not overlap one). A peer that cannot be had is said, and the rest
    # is still measured.
    command, problem = None, None
    try:
        command = ensure_venv(peer_venv, echo)
    except UserError as exc:
        problem = str(exc)
    texts = bench_texts()
    echo(
        f"model {version}; {seconds:.0f} s per figure, in {SLICE_SECONDS:.0f} s turns; "
        "the load generator shares the cores"
    )
    raw = RawModel(version_dir, version, texts, settings.max_seq_len)

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
        ours = Server(
            "guardloop", service.url, service.process.pid, _guardloop_bodies(texts), time.perf_counter() - started
        )
        theirs, process = None, None
        try:
            if command is not None:
                started = time.perf_counter()
                try:
                    model_dir = hf_model_dir(version_dir, tmp / "peer-model")
                    process = start_infinity(command, model_dir, free_port(), batch_size=BATCH, log_dir=tmp)
                except UserError as exc:
                    problem = str(exc)
                else:
                    theirs = Server(
                        "infinity", process.url, process.process.pid, _peer_bodies(texts), time.perf_counter() - started
                    )
            if problem:
                echo(f"the peer is left out: {problem}")
            measure(raw, [ours] if theirs is None else [ours, theirs], seconds, echo)
        finally:
            if process is not None:
                process.stop()
            service.stop()

    ref = None
    if reference:
        from guardloop.bench.classify import pipeline_reference

        ref_lat, _ = pipeline_reference(texts, 100)
        ref = (percentile(ref_lat, 50), percentile(ref_lat, 99), 1000 / statistics.mean(ref_lat))
    report(raw.figures(), ours, theirs, ref, echo)


def _guardloop_bodies(texts: list[str]) -> list[bytes]:
    return [json.dumps({"text": text}).encode() for text in texts]


def _peer_bodies(texts: list[str]) -> list[bytes]:
    return [request_body(text) for text in texts]


def report(
    raw: RawFigures,
    ours: Server,
    theirs: Server | None,
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
    for row in (ours,) if theirs is None else (ours, theirs):
        lo, hi = row.served[c_lo], row.served[c_hi]
        echo(
            f"{row.name:<30}{percentile(row.latencies_ms, 50):>8.2f}{percentile(row.latencies_ms, 99):>8.2f}"
            f"{lo.rate:>9.0f}{percentile(lo.latencies_ms, 99):>8.1f}"
            f"{hi.rate:>9.0f}{percentile(hi.latencies_ms, 99):>8.1f}"
            f"{row.rss_mb:>8.0f}{row.ready_seconds:>8.1f}"
        )
    echo(f"{'raw ONNX, in process':<30}{raw.forward_p50_ms:>8.2f}{'':>8}{raw.two_threads:>9.0f}  (2 threads)")
    if ref is not None:
        echo(f"{'transformers pipeline (torch)':<30}{ref[0]:>8.2f}{ref[1]:>8.2f}{ref[2]:>9.0f}  (one call per text)")
    echo("")
    echo(
        f"raw ONNX: one text {raw.forward_p50_ms:.2f} ms; batches of {BATCH}: {raw.one_thread:.0f} texts/s on one "
        f"thread, {raw.two_threads:.0f} on two"
    )
    ours_lo, ours_p50 = ours.served[c_lo], percentile(ours.latencies_ms, 50)
    echo(
        f"guardloop c={c_lo}: {ours_lo.rate / raw.two_threads:.0%} of the raw two-thread figure (target >= 75%), "
        f"p99 {percentile(ours_lo.latencies_ms, 99):.1f} ms (target < 60)"
    )
    floor_ms = 1000 * c_lo / raw.two_threads  # Little's law: c in flight, served no faster than the model runs
    echo(f"floor at c={c_lo}: mean latency >= {floor_ms:.0f} ms from the model alone on two threads (no p99 below)")
    echo(f"guardloop c=1: p50 {ours_p50 / raw.forward_p50_ms:.2f}x the raw forward pass (target <= 1.7x)")
    efficiency = ours_lo.per_cpu_second / raw.per_cpu_second
    peer = f", infinity {theirs.served[c_lo].per_cpu_second:.0f}" if theirs is not None else ""
    echo(
        f"texts per CPU-second at c={c_lo} (whole server process, every thread; less skewed by other jobs than "
        f"texts/s): guardloop {ours_lo.per_cpu_second:.0f}{peer}; raw ONNX in batches of {BATCH} "
        f"{raw.per_cpu_second:.0f} (guardloop / raw: {efficiency:.0%})"
    )
    generator = ", ".join(
        f"{row.name} {1000 * row.served[c_lo].generator_cpu_seconds / row.served[c_lo].texts:.2f}"
        for row in ((ours,) if theirs is None else (ours, theirs))
    )
    echo(f"the load generator's own CPU per request at c={c_lo}, on the same cores (ms): {generator}")
    echo(f"cold start, process start to ready (0.2 s polls): guardloop {ours.ready_seconds:.1f} s (/readyz 200)")
    if theirs is None:
        return
    theirs_lo, theirs_p50 = theirs.served[c_lo], percentile(theirs.latencies_ms, 50)
    echo(
        f"guardloop / infinity: texts/s {ours_lo.rate / theirs_lo.rate:.2f}x at c={c_lo}, "
        f"{ours.served[c_hi].rate / theirs.served[c_hi].rate:.2f}x at c={c_hi}; "
        f"p50 at c=1 {ours_p50 / theirs_p50:.2f}x (lower is better); RSS {ours.rss_mb / theirs.rss_mb:.2f}x"
    )
    echo(f"infinity cold start: {theirs.ready_seconds:.1f} s (/health 200, its own warm-up off)")

"""`guardloop bench soak`: steady load on a running service while models are hot-swapped and a reviewer labels.

One service runs on loopback (its own process) from a temporary registry holding two published versions: the
registry's current model and a twin of it under another name, so every swap is a real load and warm-up of the
full model. A second process sends /classify requests at a fixed rate (open loop: the schedule does not wait
for answers). The run has three phases:

    warm-up    not counted
    baseline   load and a reviewer labeling, no swaps
    swaps      the same, and every few seconds the other version is promoted and /admin/reload swaps to it
               (with GUARDLOOP_WORKERS above 1, the worker that answers it; every worker also polls the registry
               each second, so each swaps on its own)

Meanwhile this process samples the service's resident memory (/proc/<pid>/status, its workers' included) every
second. It prints one row per interval (requests, errors, p50/p99, memory, swaps) and a summary held to three
targets: no failed request, p99 with swaps at most 2x the baseline's, and memory after warm-up growing by at most
a bound.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import typer

from guardloop.bench.classify import percentile
from guardloop.bench.pool import start_service, text_mix
from guardloop.bench.processes import tree_rss_mb
from guardloop.core.errors import UserError
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.models.registry import ModelRegistry
from guardloop.storage import Database, LabelRequest, PoolRepository, ReviewerRepository

WARM_UP_SECONDS = 5.0
REVIEWER = "soak-reviewer"


@dataclass(frozen=True)
class Sample:
    at: float  # wall-clock time the request was sent
    ms: float  # latency, from sending to the full answer
    status: int  # HTTP status; 0: no answer (connection error, timeout); -1: a 200 whose body is not JSON
    version: str  # the model version that answered ("" without an answer)


# ----------------------------------------------------------------------------- the load process
def run_load(url: str, rate: float, start_at: float, seconds: float, texts: list[str], results) -> None:
    """Send `rate` requests per second from `start_at` for `seconds`; send the samples back through `results`."""
    results.send(asyncio.run(_load(url, rate, start_at, seconds, texts)))
    results.close()


async def _load(url: str, rate: float, start_at: float, seconds: float, texts: list[str]) -> list[Sample]:
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(text: str) -> None:
            sent = time.time()
            started = time.perf_counter()
            status, version = 0, ""
            try:
                response = await client.post("/classify", json={"text": text})
                status = response.status_code
                version = response.json().get("model_version", "")
            except httpx.HTTPError:
                pass  # no answer: status 0
            except ValueError:  # an answer whose body is not JSON keeps its status; a 200 like that is -1
                status = -1 if status == 200 else status
            samples.append(Sample(sent, (time.perf_counter() - started) * 1000, status, version))

        tasks = set()
        total = int(rate * seconds)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        for n in range(total):
            # Open loop: request n leaves at its scheduled time whether or not earlier ones were answered.
            await asyncio.sleep(max(0.0, start_at + n / rate - time.time()))
            task = asyncio.create_task(one(texts[n % len(texts)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return samples


# ----------------------------------------------------------------------------- what runs beside the load
@dataclass
class Background:
    """The memory sampler, the reviewer and the swapper: threads of this process, stopped by `stop`."""

    url: str
    pid: int
    admin_token: str
    reviewer_token: str
    database: Database
    registry: ModelRegistry
    versions: tuple[str, str]
    swap_every: float
    swaps_from: float  # wall-clock time the swap phase starts
    memory: list[tuple[float, float]] = field(default_factory=list)  # (time, MB)
    swaps: list[tuple[float, str, bool]] = field(default_factory=list)  # (time, version, swapped)
    labels: int = 0
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=job, daemon=True) for job in (self._sample, self._review, self._swap)]
        for thread in threads:
            thread.start()
        return threads

    def _sample(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.memory.append((time.time(), tree_rss_mb(self.pid)))
            except OSError:  # the service is gone (ProcessLookupError): the report says why
                return

    def _review(self) -> None:
        """Ask for labels the way the trainer does (straight into the database), and label them over HTTP."""
        pool = PoolRepository(self.database)
        headers = {"Authorization": f"Bearer {self.reviewer_token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            while not self.stop.wait(0.5):
                try:
                    queue = client.get("/review/queue", params={"limit": 1}).json()
                    if not queue["items"]:
                        unrequested = []  # 50 at a time: the scan runs every ~25 s, not on every queue check
                        for item in pool.iter_items(unrequested_only=True):
                            unrequested.append(item.id)
                            if len(unrequested) == 50:
                                break
                        pool.mark_requested(
                            [LabelRequest(item_id, {"strategy": "soak"}, 0.5) for item_id in unrequested],
                            at=datetime.now(UTC),
                        )
                        continue
                    item = queue["items"][0]
                    answer = client.post(f"/review/items/{item['id']}/label", json={"label": LABELS[item["id"] % 6]})
                    if answer.status_code == 201:
                        self.labels += 1
                    else:
                        self.problems.append(f"labeling answered {answer.status_code}: {answer.text[:200]}")
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    self.problems.append(f"reviewer: {type(exc).__name__}: {exc}")

    def _swap(self) -> None:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as client:
            if self.stop.wait(max(0.0, self.swaps_from - time.time())):
                return
            n = 0
            while not self.stop.is_set():
                n += 1
                target = self.versions[n % 2]
                self.registry.promote(target)
                try:
                    answer = client.post("/admin/reload")
                except httpx.HTTPError as exc:
                    self.problems.append(f"swap to {target}: {type(exc).__name__}: {exc}")
                    self.swaps.append((time.time(), target, False))
                    self.stop.wait(self.swap_every)
                    continue
                swapped = answer.status_code == 200 and answer.json().get("serving") == target
                if not swapped:
                    self.problems.append(f"swap to {target} answered {answer.status_code}: {answer.text[:200]}")
                self.swaps.append((time.time(), target, swapped))
                self.stop.wait(self.swap_every)


# ----------------------------------------------------------------------------- set-up and report
def soak_registry(source: ModelRegistry, root: Path) -> tuple[ModelRegistry, tuple[str, str]]:
    """A registry with the source's current model and a twin of it (same files, another name)."""
    current = source.current()
    if current is None:
        raise UserError(f"no current model in {source.root}; train one (guardloop train) or pass --registry-dir")
    registry = ModelRegistry(root)
    card = source.card(current)
    registry.publish(source.path(current), card)
    twin = card.model_copy(update={"version": f"{current[:55]}-twin", "created_at": datetime.now(UTC)})
    registry.publish(source.path(current), twin, make_current=False)
    return registry, (current, twin.version)


@dataclass
class Window:
    start: float
    end: float
    phase: str


def summarize(samples: list[Sample]) -> tuple[int, int, float, float]:
    """(requests, failed, p50 ms, p99 ms) of the answered ones."""
    ok = [sample.ms for sample in samples if sample.status == 200]
    failed = sum(1 for sample in samples if sample.status != 200)
    if not ok:
        return len(samples), failed, float("nan"), float("nan")
    return len(samples), failed, percentile(ok, 50), percentile(ok, 99)


def run_soak_bench(
    *,
    settings: Settings,
    registry_dir: Path,
    seconds: float,
    baseline_seconds: float,
    rate: float,
    swap_every: float,
    interval: float,
    memory_bound_mb: float,
    p99_ratio: float = 2.0,
    schedule_slack: float = 1.0,
) -> bool:
    """Run the soak and print its report; True when every target was met."""
    with tempfile.TemporaryDirectory(prefix="guardloop-soak-") as tmp_name:
        tmp = Path(tmp_name)
        registry, versions = soak_registry(ModelRegistry(registry_dir), tmp / "registry")
        database_url = f"sqlite:///{tmp / 'soak.db'}"
        database = Database(database_url)
        database.ensure_schema()
        reviewer_token = ReviewerRepository(database).add(REVIEWER)
        admin_token = secrets.token_urlsafe(24)
        total = WARM_UP_SECONDS + baseline_seconds + seconds
        texts = text_mix(int(rate * total) + 1, 0.6, settings.seed)
        typer.echo(
            f"soak: {rate:g} requests/s for {WARM_UP_SECONDS:g} s warm-up + {baseline_seconds:g} s baseline + "
            f"{seconds:g} s with a swap every {swap_every:g} s between {versions[0]} and {versions[1]}",
            err=True,
        )
        service = start_service(
            "soak",
            settings=settings,
            registry_dir=registry.root,
            data_dir=tmp / "data",
            database_url=database_url,
            pool=True,
            admin_token=admin_token,
            extra_env={"GUARDLOOP_REGISTRY_POLL_SECONDS": "1"} if settings.workers > 1 else None,
        )
        try:
            start_at = time.time() + 2.0  # time for the load process to start
            baseline_from = start_at + WARM_UP_SECONDS
            swaps_from = baseline_from + baseline_seconds
            context = multiprocessing.get_context("spawn")
            receiving, sending = context.Pipe(duplex=False)
            load = context.Process(
                target=run_load, args=(service.url, rate, start_at, total, texts, sending), daemon=True
            )
            load.start()
            sending.close()
            background = Background(
                service.url,
                service.process.pid,
                admin_token,
                reviewer_token,
                database,
                registry,
                versions,
                swap_every,
                swaps_from,
            )
            threads = background.start()
            samples: list[Sample] = receiving.recv()  # blocks until the load process is done
            load.join(timeout=30)
            background.stop.set()
            for thread in threads:
                thread.join(timeout=60)
            if service.process.poll() is not None:  # it died under the load: say how, with its last words
                log_tail = service.log_path.read_text(errors="replace").splitlines()[-30:]
                background.problems.insert(
                    0,
                    f"the service exited with code {service.process.returncode}; its log ends:\n" + "\n".join(log_tail),
                )
        finally:
            service.stop()
            database.dispose()
            shutil.rmtree(tmp / "data", ignore_errors=True)

    return report(
        samples,
        background,
        baseline_from=baseline_from,
        swaps_from=swaps_from,
        end=swaps_from + seconds,
        interval=interval,
        memory_bound_mb=memory_bound_mb,
        p99_ratio=p99_ratio,
        schedule_slack=schedule_slack,
        rate=rate,
    )


def report(
    samples: list[Sample],
    background: Background,
    *,
    baseline_from: float,
    swaps_from: float,
    end: float,
    interval: float,
    memory_bound_mb: float,
    rate: float,
    p99_ratio: float = 2.0,
    schedule_slack: float = 1.0,
) -> bool:
    windows = [Window(baseline_from - WARM_UP_SECONDS, baseline_from, "warm-up")]
    edges = [baseline_from + i * interval for i in range(round((end - baseline_from) / interval) + 1)]
    windows += [Window(a, b, "baseline" if a < swaps_from else "swaps") for a, b in itertools.pairwise(edges)]
    header = f"{'t (s)':>7} {'phase':<9}{'requests':>9}{'errors':>7}{'p50 ms':>8}{'p99 ms':>8}{'RSS MB':>8}"
    typer.echo(header + f"{'swaps':>6}")
    for window in windows:
        inside = [s for s in samples if window.start <= s.at < window.end]
        requests, failed, p50, p99 = summarize(inside)
        rss = [mb for at, mb in background.memory if window.start <= at < window.end]
        swaps = sum(1 for at, _, _ in background.swaps if window.start <= at < window.end)
        typer.echo(
            f"{window.end - baseline_from:>7.0f} {window.phase:<9}{requests:>9}{failed:>7}{p50:>8.2f}{p99:>8.2f}"
            f"{(max(rss) if rss else float('nan')):>8.1f}{swaps:>6}"
        )

    counted = [s for s in samples if s.at >= baseline_from]
    base = [s for s in counted if s.at < swaps_from]
    swapping = [s for s in counted if s.at >= swaps_from]
    base_n, base_failed, base_p50, base_p99 = summarize(base)
    swap_n, swap_failed, swap_p50, swap_p99 = summarize(swapping)
    failed_total = sum(1 for s in samples if s.status != 200)
    # Which answers failed (0: no answer at all), so a failed target says whether it was timeouts or refusals.
    failed_by_status = Counter(s.status for s in samples if s.status != 200)
    done_swaps = [swap for swap in background.swaps if swap[2]]
    versions_seen = {s.version for s in swapping if s.version}
    # Memory after warm-up: from the fourth completed swap on (both versions loaded twice, the allocator's arenas
    # in use). Compared as the lowest reading of the first and of the last 5 s, so a swap caught half-way (two
    # models in memory for a moment) does not count as growth.
    settled_at = done_swaps[3][0] if len(done_swaps) >= 4 else swaps_from
    settled = [(at, mb) for at, mb in background.memory if at >= settled_at]
    if len(settled) >= 2:
        first = min(mb for at, mb in settled if at < settled[0][0] + 5)
        last = min(mb for at, mb in settled if at > settled[-1][0] - 5)
        growth = last - first
    else:
        first = last = growth = float("nan")
    typer.echo(
        f"served {len(samples)} requests ({failed_total} failed, warm-up included"
        + "".join(f"; {n} x status {status}" for status, n in sorted(failed_by_status.items()))
        + "); "
        f"{len(done_swaps)} swaps done of {len(background.swaps)}, versions answering during swaps: "
        f"{', '.join(sorted(versions_seen))}; {background.labels} labels given"
    )
    typer.echo(
        f"baseline: {base_n} requests, p50 {base_p50:.2f} ms, p99 {base_p99:.2f} ms | "
        f"swaps: {swap_n} requests, p50 {swap_p50:.2f} ms, p99 {swap_p99:.2f} ms ({swap_p99 / base_p99:.2f}x)"
    )
    if background.memory:
        typer.echo(
            f"memory: {background.memory[0][1]:.1f} MB at start, {max(mb for _, mb in background.memory):.1f} MB "
            f"at most, {first:.1f} -> {last:.1f} MB after warm-up ({growth:+.1f} MB; lowest of the first and "
            "the last 5 s)"
        )
    # Open loop: a request leaves at its scheduled time unless the sending process itself is starved of CPU.
    # Sent late, the load was not the one asked for and the latencies measure a queue, not the service.
    behind = max((s.at for s in samples), default=end) - end
    if behind > schedule_slack:
        typer.echo(
            f"the load fell {behind:.0f} s behind its schedule: this machine cannot send and serve {rate:g} "
            "requests/s; lower --rate"
        )
    for problem in background.problems[:10]:
        typer.echo(f"problem: {problem}")
    targets = [
        ("zero failed requests", failed_total == 0 and base_failed == swap_failed == 0),
        (f"p99 with swaps <= {p99_ratio:g}x baseline", swap_p99 <= p99_ratio * base_p99),
        (f"memory growth after warm-up <= {memory_bound_mb:g} MB", growth <= memory_bound_mb),
        ("every swap done", bool(background.swaps) and len(done_swaps) == len(background.swaps)),
        (f"load sent on schedule (within {schedule_slack:g} s)", behind <= schedule_slack),
    ]
    for name, met in targets:
        typer.echo(f"{'PASS' if met else 'FAIL'}  {name}")
    return all(met for _, met in targets)

"""`guardloop bench pool`: what pool logging costs /classify, and what it leaves in the pool.

Two services run on loopback from the same registry, one with pool logging on and one with it off; every
text of a mixed stream (new texts, repeats, repeats in other case and spacing) is sent to both, in
alternating order, so both see the same load and the same noise. Then the pool is read back and checked
against what the responses said: every uncertain text exactly once, its sightings counted, about
`pool_sample_rate` of the confident calls sampled, and no duplicate rows.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import typer

from guardloop.core.seed import SEED_DIR
from guardloop.core.settings import Settings
from guardloop.storage import UNCERTAIN, Database, PoolRepository, StorageError, safe_url
from guardloop.storage.texts import normalize_text, text_hash

WARM_UP_CALLS = 50


def seed_texts() -> list[str]:
    texts = []
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (SEED_DIR / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
    return texts


def text_mix(calls: int, distinct_share: float, seed: int) -> list[str]:
    """`calls` texts: a share of new ones (seed texts, tagged or joined in pairs, which makes the model
    unsure), the rest repeats of earlier ones, some re-cased or re-spaced (the same text to the pool)."""
    rng = random.Random(seed)
    base = seed_texts()
    sent: list[str] = []
    for n in range(calls):
        if not sent or rng.random() < distinct_share:
            if rng.random() < 0.5:
                text = f"{rng.choice(base)} (message {n})"
            else:
                text = f"{rng.choice(base)} {rng.choice(base)}"
        else:
            text = rng.choice(sent)
            variant = rng.random()
            if variant < 0.2:
                text = text.upper()
            elif variant < 0.4:
                text = "  " + text.replace(" ", "   ") + " "
        sent.append(text)
    return sent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    timings_ms: list[float] = field(default_factory=list)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_service(
    name: str,
    *,
    settings: Settings,
    registry_dir: Path,
    data_dir: Path,
    database_url: str | None,
    pool: bool,
    admin_token: str,
    extra_env: dict[str, str] | None = None,
) -> Service:
    port = free_port()
    # Only what the benchmark decides: both services identical but for pool logging (and their data dirs).
    env = {key: value for key, value in os.environ.items() if not key.startswith("GUARDLOOP_")}
    env.update(
        {
            "GUARDLOOP_REGISTRY_DIR": str(registry_dir),
            "GUARDLOOP_DATA_DIR": str(data_dir),
            "GUARDLOOP_POOL_ENABLED": "true" if pool else "false",
            "GUARDLOOP_POOL_UNCERTAINTY_MEASURE": "entropy",
            "GUARDLOOP_POOL_UNCERTAINTY_THRESHOLD": repr(settings.pool_uncertainty_threshold),
            "GUARDLOOP_POOL_SAMPLE_RATE": repr(settings.pool_sample_rate),
            "GUARDLOOP_SEED": str(settings.seed),
            "GUARDLOOP_ONNX_THREADS": str(settings.onnx_threads),
            "GUARDLOOP_WORKERS": str(settings.workers),
            "GUARDLOOP_ADMIN_TOKEN": admin_token,
            "GUARDLOOP_REGISTRY_POLL_SECONDS": "3600",
        }
    )
    if database_url:
        env["GUARDLOOP_DATABASE_URL"] = database_url
    env.update(extra_env or {})  # what another benchmark sets on top (e.g. API keys naming its clients)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "service.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guardloop.cli",
                "serve",
                "--no-bootstrap",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    service = Service(name, f"http://127.0.0.1:{port}", process, log_path)
    if wait_until_ready(process, f"{service.url}/readyz", seconds=120):
        return service
    if process.poll() is not None:
        raise RuntimeError(f"the {name} service exited: {log_path.read_text(errors='replace')[-2000:]}")
    service.stop()
    raise RuntimeError(f"the {name} service was not ready within 120 s; see {log_path}")


def wait_until_ready(process: subprocess.Popen, ready_url: str, *, seconds: float) -> bool:
    """Poll `ready_url` until it answers 200 (True), the process exits or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def wait_until_written(service: Service, admin_token: str, timeout: float = 120) -> dict:
    """Poll /admin/pool until the writer has nothing queued and accounted for every record it was offered."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{service.url}/admin/pool", headers=headers, timeout=10).json()
        writer = status["writer"]
        if writer["queued"] == 0 and writer["offered"] == writer["written"] + writer["duplicates"] + writer["dropped"]:
            return status
        time.sleep(0.2)
    return status


def run_pool_bench(
    *,
    calls: int,
    database_url: str | None,
    registry_dir: Path,
    distinct_share: float,
    seed: int,
    settings: Settings,
) -> None:
    from guardloop.models.registry import ModelRegistry, RegistryError

    # Errors the CLI prints as one line (not cli.UserError: under `python -m guardloop.cli` that is another class).
    if ModelRegistry(registry_dir).current() is None:
        raise RegistryError(f"no current model in {registry_dir}; train one (guardloop train) or pass --registry-dir")
    threshold = settings.pool_uncertainty_threshold
    with tempfile.TemporaryDirectory(prefix="guardloop-bench-pool-") as tmp_name:
        tmp = Path(tmp_name)
        url = database_url or f"sqlite:///{tmp / 'pool.db'}"
        database = Database(url)
        database.ensure_schema()
        pool = PoolRepository(database)
        if pool.count():
            raise StorageError(
                f"the pool at {safe_url(database.url)} is not empty; point --database-url at an empty database"
            )
        texts = text_mix(calls, distinct_share, seed)
        warm_up = text_mix(WARM_UP_CALLS, 1.0, seed + 1)
        admin_token = secrets.token_urlsafe(24)
        backend = "PostgreSQL" if database.dialect == "postgresql" else "SQLite (WAL)"
        typer.echo(f"pool benchmark: {calls} calls per service, {backend} at {safe_url(database.url)}", err=True)
        common = {"settings": settings, "registry_dir": registry_dir, "admin_token": admin_token}
        on = start_service("pool on", data_dir=tmp / "on", database_url=url, pool=True, **common)
        off = None
        try:
            off = start_service("pool off", data_dir=tmp / "off", database_url=None, pool=False, **common)
            uncertainty_by_hash: dict[str, list[float]] = {}
            calls_by_hash: Counter[str] = Counter()
            with (
                httpx.Client(base_url=on.url, timeout=30) as on_client,
                httpx.Client(base_url=off.url, timeout=30) as off_client,
            ):
                clients = {on.name: on_client, off.name: off_client}

                def call(service: Service, text: str, timed: bool) -> None:
                    start = time.perf_counter()
                    response = clients[service.name].post("/classify", json={"text": text})
                    elapsed = (time.perf_counter() - start) * 1000
                    if response.status_code != 200:
                        raise RuntimeError(
                            f"{service.name}: /classify answered {response.status_code}: {response.text[:200]}"
                        )
                    if timed:
                        service.timings_ms.append(elapsed)
                    if service is on:
                        key = text_hash(text)
                        uncertainty_by_hash.setdefault(key, []).append(response.json()["results"][0]["uncertainty"])
                        calls_by_hash[key] += 1

                for text in warm_up:
                    call(on, text, timed=False)
                    call(off, text, timed=False)
                started = time.perf_counter()
                for i, text in enumerate(texts):
                    first, second = (on, off) if i % 2 == 0 else (off, on)
                    call(first, text, timed=True)
                    call(second, text, timed=True)
                seconds = time.perf_counter() - started
            status = wait_until_written(on, admin_token)
        finally:
            on.stop()
            if off is not None:
                off.stop()

        writer = status.get("writer") or {}
        stats = pool.stats()
        duplicate_hashes = pool.duplicate_hashes()
        stored = list(pool.iter_items())
        database.dispose()

    # What the responses say the pool must hold.
    measure_uncertain = [key for key, values in uncertainty_by_hash.items() if max(values) > threshold]
    borderline = sum(1 for values in uncertainty_by_hash.values() if min(values) <= threshold < max(values))
    uncertain_calls = sum(sum(1 for v in values if v > threshold) for values in uncertainty_by_hash.values())
    total_calls = sum(calls_by_hash.values())
    confident_calls = total_calls - uncertain_calls
    rate = settings.pool_sample_rate
    expected_sampled = confident_calls * rate
    spread = 3 * math.sqrt(max(confident_calls * rate * (1 - rate), 1e-9))
    sampled_sightings = sum(item.seen_count for item in stored if item.sampled_by != UNCERTAIN)
    uncertain_sightings = sum(item.seen_count for item in stored if item.sampled_by == UNCERTAIN)
    normalized = Counter(normalize_text(item.text) for item in stored)
    duplicate_texts = sum(count - 1 for count in normalized.values() if count > 1)
    hash_mismatches = sum(1 for item in stored if text_hash(item.text) != item.text_hash)

    on_p50, off_p50 = percentile(on.timings_ms, 50), percentile(off.timings_ms, 50)
    on_p99, off_p99 = percentile(on.timings_ms, 99), percentile(off.timings_ms, 99)
    typer.echo(f"backend: {backend}; {calls} timed calls per service in {seconds:.1f} s (+{WARM_UP_CALLS} warm-up)")
    typer.echo(f"{'/classify latency (c=1)':<28}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for service in (on, off):
        typer.echo(
            f"{service.name:<28}{percentile(service.timings_ms, 50):>9.2f}{percentile(service.timings_ms, 99):>9.2f}"
            f"{statistics.mean(service.timings_ms):>9.2f}"
        )
    typer.echo(f"{'ratio on / off':<28}{on_p50 / off_p50:>8.3f}x{on_p99 / off_p99:>8.3f}x")
    typer.echo(
        f"traffic: {total_calls} calls (incl. warm-up), {len(calls_by_hash)} distinct texts; "
        f"uncertain (> {threshold}) calls {uncertain_calls} = {uncertain_calls / total_calls:.1%}"
    )
    typer.echo(
        f"pool: {stats.items} rows, {stats.seen_total} sightings; uncertain rows {stats.uncertain_items} "
        f"(expected {len(measure_uncertain)}, {borderline} texts on the threshold), sightings {uncertain_sightings} "
        f"(expected {uncertain_calls})"
    )
    typer.echo(
        f"random sample: {sampled_sightings} sightings in {stats.sampled_items} rows; expected "
        f"{expected_sampled:.0f} ± {spread:.0f} ({rate:.0%} of {confident_calls} confident calls)"
    )
    share = stats.uncertain_items / stats.items if stats.items else 0.0
    typer.echo(f"uncertain share of the pool: {share:.1%} of rows")
    if uncertain_calls > 0.9 * total_calls:
        typer.echo(
            f"note: this model is unsure (> {threshold}) of {uncertain_calls / total_calls:.0%} of the traffic, so the "
            "pool keeps nearly everything; raise --uncertainty-threshold (GUARDLOOP_POOL_UNCERTAINTY_THRESHOLD)",
            err=True,
        )
    typer.echo(
        f"duplicate rows: {duplicate_hashes} by hash, {duplicate_texts} by normalized text; "
        f"hash mismatches {hash_mismatches}"
    )
    typer.echo(
        f"writer: offered {writer.get('offered')}, new rows {writer.get('written')}, "
        f"repeats {writer.get('duplicates')}, dropped {writer.get('dropped')}, "
        f"write errors {writer.get('write_errors')}"
    )

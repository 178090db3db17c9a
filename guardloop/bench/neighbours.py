"""`guardloop bench neighbours`: what a light caller sees when heavy and hostile callers share the service.

One service runs on loopback (its own process) with the registry's current model and an API key per client, so
each client is its own client to the fair batcher and the per-client limits. Two phases of `seconds` each:

    alone    a light client sends one short text at a time, at most LIGHT_REQUESTS_PER_SECOND (a light caller:
             well inside its own per-client tokens/s limit on any machine, so its failures are its neighbours')
    beside   the same light client, while two heavy clients send the largest legal request (max_texts texts of
             max_text_chars characters) in a loop, honouring Retry-After, and a hostile client sends malformed
             requests (lone surrogates in raw JSON, oversized bodies, invalid JSON)

It prints the light client's p50/p99/failures side by side, the heavy clients' answers by status with their
longest wait, the hostile client's answers, and whether the targets hold: the light p99 beside them at most
`p99_ratio` times its p99 alone, no failed light request, no heavy request waiting more than `heavy_wait_ratio`
times what one heavy request takes on an idle service (past its fair share a heavy client is refused at once,
with Retry-After, instead of queueing), and no 5xx but 503 to anyone.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import typer

from guardloop.bench.classify import bench_texts, percentile
from guardloop.bench.pool import start_service
from guardloop.core.errors import UserError
from guardloop.core.settings import Settings
from guardloop.models.registry import ModelRegistry

CLIENTS = ("light", "heavy-1", "heavy-2", "hostile")
# A closed loop with no pause is not light: on a fast machine it sent ~550 one-text requests/s and met its own
# per-client tokens/s limit (429s counted as failures caused by no neighbour). 50/s of short texts is ~1,000 tokens/s.
LIGHT_REQUESTS_PER_SECOND = 50
# Each client connects from its own loopback address, as separate callers come from separate addresses: the
# per-address limits then act as in production. From one shared 127.0.0.1, the hostile client's ~1,400 requests/s
# met the per-IP request limit and the light client's requests were refused with it.
CLIENT_ADDRESSES = {"light": "127.0.0.2", "heavy-1": "127.0.0.3", "heavy-2": "127.0.0.4", "hostile": "127.0.0.5"}


@dataclass
class ClientLog:
    """What one client got: latency (ms) of each answer, statuses, and the Retry-After values it was given."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: list[float] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)


async def post(url: str, path: str, body: bytes, headers: dict[str, str], source: str) -> tuple[int, dict[str, str]]:
    """One request on a fresh connection (Connection: close) from address `source`: status and headers; 0 when no
    answer came."""
    host, port = url.removeprefix("http://").split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
    except OSError:
        return 0, {}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nConnection: close\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, answer_headers = 0, {}
    try:
        # Read while writing: a body refused unread (413) is answered and the connection closed mid-upload.
        sending = asyncio.ensure_future(writer.drain())
        status = int((await reader.readline()).split()[1])
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            answer_headers[name.strip().lower()] = value.strip()
        await reader.read()
        await asyncio.gather(sending, return_exceptions=True)
    except (OSError, IndexError, ValueError):
        pass
    finally:
        writer.close()
    return status, answer_headers


async def light_client(url: str, key: str, texts: list[str], until: float, log: ClientLog) -> None:
    """One request at a time, started at most LIGHT_REQUESTS_PER_SECOND apart (sooner answers wait their turn)."""
    headers = {"Authorization": f"Bearer {key}"}
    n = 0
    next_start = time.monotonic()
    while (now := time.monotonic()) < until:
        await asyncio.sleep(max(0.0, next_start - now))
        next_start = max(next_start, now) + 1 / LIGHT_REQUESTS_PER_SECOND
        body = json.dumps({"text": texts[n % len(texts)]}).encode()
        started = time.perf_counter()
        status, _ = await post(url, "/classify", body, headers, CLIENT_ADDRESSES["light"])
        log.latencies_ms.append((time.perf_counter() - started) * 1000)
        log.statuses[status] += 1
        n += 1


async def heavy_client(url: str, key: str, body: bytes, until: float, log: ClientLog, source: str) -> None:
    """Send `body` again and again until `until` (at least once), waiting out each Retry-After."""
    headers = {"Authorization": f"Bearer {key}"}
    while not log.statuses or time.monotonic() < until:
        started = time.perf_counter()
        status, answer = await post(url, "/classify", body, headers, source)
        log.latencies_ms.append((time.perf_counter() - started) * 1000)
        log.statuses[status] += 1
        if "retry-after" in answer:
            wait = float(answer["retry-after"])
            log.retry_after.append(wait)
            await asyncio.sleep(min(wait, max(0.0, until - time.monotonic())))  # a well-behaved client waits


def hostile_bodies(max_body_bytes: int) -> list[bytes]:
    return [
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"texts": ["fine", "\\udfff\\ud800 reversed pair"]}',
        b'{"text": "unterminated',
        b'{"text": ' + b'"' + b"a" * (max_body_bytes + 10) + b'"}',
        b"not json at all",
    ]


async def hostile_client(url: str, key: str, max_body_bytes: int, until: float, log: ClientLog) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    bodies = hostile_bodies(max_body_bytes)
    n = 0
    while time.monotonic() < until:
        status, _ = await post(url, "/classify", bodies[n % len(bodies)], headers, CLIENT_ADDRESSES["hostile"])
        log.statuses[status] += 1
        n += 1


async def run_phases(url: str, keys: dict[str, str], settings: Settings, seconds: float) -> dict[str, ClientLog]:
    texts = bench_texts()
    warm = ClientLog()
    await light_client(url, keys["light"], texts, time.monotonic() + 2, warm)  # connections, caches
    logs = {"alone": ClientLog(), "heavy alone": ClientLog(), "beside": ClientLog()}
    logs |= {name: ClientLog() for name in CLIENTS[1:]}
    await light_client(url, keys["light"], texts, time.monotonic() + seconds, logs["alone"])
    heavy_body = json.dumps({"texts": [("x" * 9 + " ") * (settings.max_text_chars // 10)] * settings.max_texts})
    heavy_1 = CLIENT_ADDRESSES["heavy-1"]
    await heavy_client(url, keys["heavy-1"], heavy_body.encode(), time.monotonic(), logs["heavy alone"], heavy_1)
    await asyncio.sleep(max(logs["heavy alone"].retry_after, default=0))  # its work limit refills
    until = time.monotonic() + seconds + 1
    others = [
        heavy_client(url, keys[name], heavy_body.encode(), until, logs[name], CLIENT_ADDRESSES[name])
        for name in ("heavy-1", "heavy-2")
    ] + [hostile_client(url, keys["hostile"], settings.max_body_bytes, until, logs["hostile"])]
    tasks = [asyncio.create_task(other) for other in others]
    await asyncio.sleep(1)  # the heavy clients' first requests are in
    await light_client(url, keys["light"], texts, time.monotonic() + seconds, logs["beside"])
    await asyncio.gather(*tasks)
    return logs


def report(logs: dict[str, ClientLog], *, p99_ratio: float, heavy_wait_ratio: float) -> bool:
    alone, beside = logs["alone"], logs["beside"]
    typer.echo(f"{'light client (one short text)':<32}{'alone':>12}{'beside':>12}")
    for name, value in (
        ("requests", lambda log: f"{len(log.latencies_ms)}"),
        ("failed", lambda log: f"{log.failures}"),
        ("p50 ms", lambda log: f"{percentile(log.latencies_ms, 50):.1f}"),
        ("p99 ms", lambda log: f"{percentile(log.latencies_ms, 99):.1f}"),
    ):
        typer.echo(f"{name:<32}{value(alone):>12}{value(beside):>12}")
    ratio = percentile(beside.latencies_ms, 99) / percentile(alone.latencies_ms, 99)
    heavy_wait = 0.0
    for name in ("heavy-1", "heavy-2"):
        log = logs[name]
        longest = max(log.latencies_ms, default=0.0) / 1000
        heavy_wait = max(heavy_wait, longest)
        typer.echo(
            f"{name}: answers {dict(sorted(log.statuses.items()))}, longest wait {longest:.2f} s, "
            f"Retry-After given {len(log.retry_after)}x (mean {statistics.fmean(log.retry_after or [0]):.1f} s)"
        )
    heavy_alone = max(logs["heavy alone"].latencies_ms) / 1000
    typer.echo(f"one heavy request alone: {heavy_alone:.2f} s, answered {dict(logs['heavy alone'].statuses)}")
    typer.echo(f"hostile: answers {dict(sorted(logs['hostile'].statuses.items()))}")
    server_errors = sum(
        n for log in logs.values() for status, n in log.statuses.items() if status >= 500 and status != 503
    )
    no_answer = sum(log.statuses.get(0, 0) for log in logs.values())
    targets = [
        (f"light p99 beside / alone = {ratio:.2f} (at most {p99_ratio:g})", ratio <= p99_ratio),
        (f"light requests failed: {beside.failures + alone.failures} (none)", beside.failures + alone.failures == 0),
        (
            f"longest heavy wait {heavy_wait:.2f} s (at most {heavy_wait_ratio:g} x one heavy request alone)",
            heavy_wait <= heavy_wait_ratio * heavy_alone,
        ),
        (f"5xx other than 503, or no answer: {server_errors + no_answer} (none)", server_errors + no_answer == 0),
    ]
    for text, met in targets:
        typer.echo(f"{'met   ' if met else 'MISSED'} {text}")
    return all(met for _, met in targets)


def run_neighbours_bench(
    *,
    settings: Settings,
    registry_dir: Path,
    seconds: float,
    p99_ratio: float = 5.0,
    heavy_wait_ratio: float = 2.5,
    extra_env: dict[str, str] | None = None,
) -> bool:
    """Run both phases against a fresh service on the registry's current model; True when every target holds."""
    if ModelRegistry(registry_dir).current() is None:
        raise UserError(f"no current model in {registry_dir}; train one (guardloop train) or pass --registry-dir")
    keys = {name: f"{name}-{secrets.token_hex(12)}" for name in CLIENTS}
    env = {"GUARDLOOP_API_KEYS": json.dumps(keys)} | (extra_env or {})
    with tempfile.TemporaryDirectory(prefix="guardloop-bench-neighbours-") as tmp:
        service = start_service(
            "neighbours",
            settings=settings,
            registry_dir=registry_dir,
            data_dir=Path(tmp) / "data",
            database_url=None,
            pool=False,
            admin_token=secrets.token_hex(16),
            extra_env=env,
        )
        try:
            logs = asyncio.run(run_phases(service.url, keys, settings, seconds))
        finally:
            service.stop()
        if service.process.returncode not in (0, -15):
            typer.echo(f"the service exited with {service.process.returncode}; its log ends:")
            typer.echo(service.log_path.read_text(errors="replace")[-2000:])
    return report(logs, p99_ratio=p99_ratio, heavy_wait_ratio=heavy_wait_ratio)

"""`guardloop bench classify`: what a chatbot sees over HTTP, beside what it would get from a plain
in-process transformers pipeline on torch."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import typer

from guardloop.core.seed import SEED_EVAL

T = TypeVar("T")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def bench_texts() -> list[str]:
    return [json.loads(line)["text"] for line in SEED_EVAL.read_text(encoding="utf-8").splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client on one socket.

    The load generator shares the machine's two cores with the server; httpx spends about as much CPU per
    request as the server does, so it would measure itself. This one only writes bytes and reads a response:
    the status line and headers in one read, then the body by its length.
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._head = (
            f"POST /classify HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{extra}Content-Length: "
        ).encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> HttpConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def classify(self, body: bytes) -> int:
        assert self._reader is not None and self._writer is not None
        self._writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head)
        await self._reader.readexactly(int(length.group(1)) if length else 0)
        return int(head.split(maxsplit=2)[1])


def run_client(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a load generator's coroutine on uvloop (installed with uvicorn[standard]) where it is available: the
    generator shares the cores with the server under test, and uvloop spends about half of asyncio's CPU per
    request (the issue's reference figures came from wrk, a C load generator)."""
    try:
        import uvloop
    except ImportError:  # not on every platform (Windows)
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _bodies(texts: list[str]) -> list[bytes]:
    return [json.dumps({"text": text}).encode() for text in texts]


async def http_latency(url: str, texts: list[str], n: int, headers: dict[str, str]) -> list[float]:
    bodies = _bodies(texts)
    timings = []
    async with HttpConnection(url, headers) as connection:
        for i in range(n + 20):
            start = time.perf_counter()
            status = await connection.classify(bodies[i % len(bodies)])
            elapsed = time.perf_counter() - start
            if status != 200:
                raise typer.BadParameter(f"/classify answered {status}; is an API key needed (--api-key)?")
            if i >= 20:  # the first requests warm connections and caches
                timings.append(elapsed * 1000)
    return timings


async def http_throughput(url: str, texts: list[str], n: int, concurrency: int, headers: dict[str, str]) -> float:
    bodies = _bodies(texts)
    counter = iter(range(n))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        async with HttpConnection(url, headers) as connection:
            await connection.classify(bodies[0])
            await ready.wait()
            for i in counter:
                failures += await connection.classify(bodies[i % len(bodies)]) != 200

    ready = asyncio.Event()
    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    ready.set()
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    if failures:
        raise typer.BadParameter(f"{failures} of {n} requests failed")
    return n / elapsed


def pipeline_reference(texts: list[str], n: int) -> tuple[list[float], float]:
    """The same architecture (all-MiniLM-L6-v2 + a 6-way head) through transformers' pipeline on torch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from guardloop.trainer.base_models import minilm_dir

    base = minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=6)
    classifier = pipeline(
        "text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(base), device="cpu", top_k=None
    )
    with torch.inference_mode():
        for t in texts[:20]:
            classifier(t)
        timings = []
        for i in range(n):
            start = time.perf_counter()
            classifier(texts[i % len(texts)])
            timings.append((time.perf_counter() - start) * 1000)
        batch = [texts[i % len(texts)] for i in range(n)]
        start = time.perf_counter()
        classifier(batch, batch_size=32)
        throughput = n / (time.perf_counter() - start)
    return timings, throughput


def run_classify_bench(url: str, *, requests: int, concurrency: int, reference: bool, api_key: str | None) -> None:
    texts = bench_texts()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        httpx.get(f"{url}/readyz", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"no ready service at {url} ({exc}); start one with `guardloop serve`") from None
    lat = run_client(http_latency(url, texts, requests, headers))
    thr = run_client(http_throughput(url, texts, requests * 2, concurrency, headers))
    rows = [("guardloop HTTP /classify", percentile(lat, 50), percentile(lat, 99), statistics.mean(lat), thr)]
    if reference:
        ref_lat, ref_batched = pipeline_reference(texts, min(requests, 500))
        # What a service built on the pipeline does: one call per request, so texts/s = 1 / latency.
        ref_per_request = 1000 / statistics.mean(ref_lat)
        rows.append(
            (
                "transformers pipeline (torch)",
                percentile(ref_lat, 50),
                percentile(ref_lat, 99),
                statistics.mean(ref_lat),
                ref_per_request,
            )
        )
    typer.echo(f"{'':<32}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'texts/s':>10}")
    typer.echo(f"{'':<32}{'(c=1)':>9}{'(c=1)':>9}{'(c=1)':>9}{f'(c={concurrency})':>10}")
    for name, p50, p99, mean, tput in rows:
        typer.echo(f"{name:<32}{p50:>9.2f}{p99:>9.2f}{mean:>9.2f}{tput:>10.1f}")
    if reference:
        (_, p50, p99, _, tput), (_, rp50, rp99, _, rtput) = rows
        typer.echo(
            f"{'ratio (pipeline / guardloop)':<32}{rp50 / p50:>8.2f}x{rp99 / p99:>8.2f}x{'':>9}"
            f"{tput / rtput:>9.2f}x (throughput guardloop / pipeline)"
        )
        typer.echo(
            f"pipeline texts/s: {ref_per_request:.1f} one call per text (a service built on it); "
            f"{ref_batched:.1f} when the caller batches 32 texts in-process "
            f"(guardloop / that: {tput / ref_batched:.2f}x)"
        )

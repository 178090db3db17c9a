"""`guardloop bench classify`: what a chatbot sees over HTTP, beside what it would get from a plain
in-process transformers pipeline on torch."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
import typer

SEED_EVAL = Path(__file__).parent / "seed" / "eval.jsonl"


def bench_texts() -> list[str]:
    return [json.loads(line)["text"] for line in SEED_EVAL.read_text(encoding="utf-8").splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def http_latency(url: str, texts: list[str], n: int, headers: dict[str, str]) -> list[float]:
    timings = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for i in range(n + 20):
            start = time.perf_counter()
            response = client.post("/classify", json={"text": texts[i % len(texts)]})
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            if i >= 20:  # the first requests warm connections and caches
                timings.append(elapsed * 1000)
    return timings


async def http_throughput(url: str, texts: list[str], n: int, concurrency: int, headers: dict[str, str]) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                response = await client.post("/classify", json={"text": texts[i % len(texts)]})
                response.raise_for_status()

        await asyncio.gather(*(client.post("/classify", json={"text": t}) for t in texts[:concurrency]))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


def pipeline_reference(texts: list[str], n: int) -> tuple[list[float], float]:
    """The same architecture (all-MiniLM-L6-v2 + a 6-way head) through transformers' pipeline on torch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from trainer.base_models import minilm_dir

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
    lat = http_latency(url, texts, requests, headers)
    thr = asyncio.run(http_throughput(url, texts, requests * 2, concurrency, headers))
    rows = [("guardloop HTTP /classify", percentile(lat, 50), percentile(lat, 99), statistics.mean(lat), thr)]
    if reference:
        ref_lat, ref_thr = pipeline_reference(texts, min(requests, 500))
        rows.append(
            (
                "transformers pipeline (torch)",
                percentile(ref_lat, 50),
                percentile(ref_lat, 99),
                statistics.mean(ref_lat),
                ref_thr,
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

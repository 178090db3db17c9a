"""`guardloop bench policy`: what a tenant policy adds per classified text, in-process, beside the model's own time.

End-to-end HTTP latency on a shared machine moves by milliseconds between runs, far more than a dictionary lookup
and a few comparisons; this times exactly the work a policy adds to /classify (find the caller's tenant, decide
each category, count the decision) on real verdicts of the served model, next to that model's forward pass.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import typer

from guardloop.bench.classify import bench_texts
from guardloop.core.errors import UserError
from guardloop.core.policy import PolicyError
from guardloop.models.registry import ModelRegistry, open_classifier
from guardloop.service.decisions import decide, record_decisions
from guardloop.service.policy_store import Policies, builtin_policies, read_policies

MAX_TENANT_ROWS = 5


def _per_text_us(policies: Policies, client: str | None, verdicts: list, thresholds: dict, repeats: int) -> float:
    """Median over `repeats` passes of the per-text time of lookup + decision + metrics, in microseconds."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for verdict in verdicts:
            policy = policies.for_client(client)
            _, decision = decide(verdict, thresholds, policy)
            record_decisions(policy, [decision])
        passes.append((time.perf_counter() - start) / len(verdicts) * 1e6)
    return statistics.median(passes)


def run_policy_bench(registry_dir: Path, policy_path: Path | None, *, repeats: int, max_seq_len: int) -> None:
    registry = ModelRegistry(registry_dir)
    version = registry.current()
    if version is None:
        raise UserError(f"no current model in {registry_dir}; train or publish one first")
    classifier = open_classifier(registry, version, max_seq_len=max_seq_len)
    texts = bench_texts()
    forward = []
    probs = []
    for text in texts:  # one text per call, as a lone /classify request runs
        start = time.perf_counter()
        probs.append(classifier.predict_proba([text])[0])
        forward.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    verdicts = [classifier.verdict(row) for row in probs]
    verdict_us = (time.perf_counter() - start) / len(texts) * 1e6
    rows: list[tuple[str, Policies, str | None]] = [
        ("no policy file (default, today's rule)", builtin_policies(), None)
    ]
    if policy_path is not None:
        try:
            loaded = read_policies(policy_path)
        except PolicyError as exc:
            raise UserError(str(exc)) from None
        rows.append((f"{policy_path.name}: default", loaded, None))
        tenants = list(loaded.file.tenants.items()) if loaded.file else []
        for name, tenant in tenants[:MAX_TENANT_ROWS]:  # every tenant runs the same code: a few show its cost
            rows.append((f"{policy_path.name}: tenant {name}", loaded, tenant.clients[0]))
    model_ms = statistics.median(forward)
    typer.echo(f"model {version}: forward pass of one text, median {model_ms:.3f} ms over {len(texts)} texts")
    typer.echo(f"verdict from its scores (today's path): {verdict_us:.2f} us per text")
    typer.echo(f"{'policy':<48}{'us/text':>10}{'of forward':>12}")
    for label, policies, client in rows:
        cost = _per_text_us(policies, client, verdicts, classifier.thresholds, repeats)
        typer.echo(f"{label[:47]:<48}{cost:>10.2f}{cost / (model_ms * 1000):>11.3%}")

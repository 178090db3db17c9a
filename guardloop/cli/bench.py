"""`guardloop bench ...`: benchmarks that print numbers (classify latency, soak with hot-swaps, pool logging cost,
a light caller beside heavy and hostile ones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from guardloop.bench.classify import run_classify_bench
from guardloop.bench.infinity_peer import DEFAULT_VENV
from guardloop.bench.label_check import run_label_check_bench
from guardloop.bench.neighbours import run_neighbours_bench
from guardloop.bench.peer import run_peer_bench
from guardloop.bench.policy_cost import run_policy_bench
from guardloop.bench.pool import run_pool_bench
from guardloop.bench.soak import run_soak_bench
from guardloop.cli.app import app, friendly_errors, load_settings
from guardloop.core.datafiles import load_examples
from guardloop.core.errors import UserError
from guardloop.trainer.training_set import base_files

bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("classify")
@friendly_errors
def bench_classify(
    url: Annotated[str, typer.Option(help="base URL of a running service")] = "http://127.0.0.1:8000",
    requests: Annotated[int, typer.Option(min=10, help="requests per measurement")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1)] = 32,
    reference: Annotated[bool, typer.Option(help="also time the in-process transformers pipeline")] = True,
    api_key: Annotated[str | None, typer.Option(envvar="GUARDLOOP_BENCH_API_KEY")] = None,
) -> None:
    """HTTP latency (concurrency 1) and throughput (concurrency N) beside a transformers pipeline on torch."""
    run_classify_bench(url, requests=requests, concurrency=concurrency, reference=reference, api_key=api_key)


@bench_app.command("peer")
@friendly_errors
def bench_peer(
    peer: Annotated[str, typer.Option(help="the dedicated inference server to compare with")] = "infinity",
    seconds: Annotated[float, typer.Option(min=2, help="seconds per figure per server, in 2 s turns")] = 10,
    registry_dir: Annotated[Path | None, typer.Option(help="whose current model to serve (default: settings)")] = None,
    peer_venv: Annotated[
        Path | None, typer.Option(help="the peer's own virtual environment, created on first use")
    ] = None,
    reference: Annotated[bool, typer.Option(help="also time the in-process transformers pipeline")] = True,
) -> None:
    """guardloop's /classify beside a dedicated inference server (Infinity) on the same ONNX model and cores:
    p50/p99 at concurrency 1, texts/s at 32 and 128, RSS, cold start, and the raw ONNX figures."""
    settings = load_settings()
    run_peer_bench(
        settings=settings,
        registry_dir=registry_dir or settings.registry_dir,
        peer=peer,
        peer_venv=peer_venv or DEFAULT_VENV,
        seconds=seconds,
        reference=reference,
    )


@bench_app.command("soak")
@friendly_errors
def bench_soak(
    seconds: Annotated[float, typer.Option(min=5, help="length of the phase with hot-swaps")] = 60,
    baseline_seconds: Annotated[float, typer.Option(min=5, help="length of the no-swap phase before it")] = 60,
    rate: Annotated[float, typer.Option(min=1, help="/classify requests per second (open loop)")] = 50,
    swap_every: Annotated[float, typer.Option(min=0.5, help="seconds between two hot-swaps")] = 5,
    interval: Annotated[float, typer.Option(min=1, help="seconds per printed row")] = 5,
    memory_bound_mb: Annotated[float, typer.Option(help="largest memory growth after warm-up that passes")] = 50,
    p99_ratio: Annotated[float, typer.Option(min=1, help="largest p99 with swaps, in baselines")] = 2,
    schedule_slack: Annotated[float, typer.Option(min=0, help="seconds the load may fall behind and pass")] = 1,
    registry_dir: Annotated[Path | None, typer.Option(help="whose current model to run (default: settings)")] = None,
) -> None:
    """Steady load from a second process while models are hot-swapped and a reviewer labels: requests, errors,
    p50/p99 and memory over time, a no-swap baseline first. Exit 1 when a target is missed."""
    settings = load_settings()
    met = run_soak_bench(
        settings=settings,
        registry_dir=registry_dir or settings.registry_dir,
        seconds=seconds,
        baseline_seconds=baseline_seconds,
        rate=rate,
        swap_every=swap_every,
        interval=interval,
        memory_bound_mb=memory_bound_mb,
        p99_ratio=p99_ratio,
        schedule_slack=schedule_slack,
    )
    if not met:
        raise typer.Exit(1)


@bench_app.command("pool")
@friendly_errors
def bench_pool(
    calls: Annotated[int, typer.Option(min=10, help="timed /classify calls per service (pool on, pool off)")] = 10_000,
    database_url: Annotated[
        str | None, typer.Option(help="an empty PostgreSQL database (default: a fresh SQLite file in a temp dir)")
    ] = None,
    registry_dir: Annotated[Path | None, typer.Option(help="model registry (default: settings)")] = None,
    distinct_share: Annotated[float, typer.Option(min=0.01, max=1.0, help="share of calls with a new text")] = 0.6,
    seed: Annotated[int, typer.Option(help="seed of the text mix")] = 13,
    uncertainty_threshold: Annotated[
        float | None, typer.Option(min=0, max=1, help="pool above this normalized entropy (default: settings)")
    ] = None,
    sample_rate: Annotated[
        float | None, typer.Option(min=0, max=1, help="share of confident calls pooled (default: settings)")
    ] = None,
) -> None:
    """/classify p50/p99 with pool logging on vs off (two services, calls interleaved), then the pool's contents."""
    settings = load_settings()
    overrides = {"pool_uncertainty_threshold": uncertainty_threshold, "pool_sample_rate": sample_rate}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    run_pool_bench(
        calls=calls,
        database_url=database_url,
        registry_dir=registry_dir or settings.registry_dir,
        distinct_share=distinct_share,
        seed=seed,
        settings=settings,
    )


@bench_app.command("quantization")
@friendly_errors
def bench_quantization(
    checkpoint: Annotated[Path, typer.Option(help="fine-tuned model saved with save_pretrained (torch weights)")],
    data: Annotated[list[Path], typer.Option("--data", help="labeled file to measure on (repeatable)")],
    calibration_data: Annotated[
        list[Path], typer.Option("--calibration-data", help="the training files: static int8 calibrates on them")
    ],
    work_dir: Annotated[Path, typer.Option(help="where the exported variants are written (kept for reruns)")],
    compare_calibrations: Annotated[
        bool, typer.Option(help="several calibration settings (choose on a dev file, not the measuring one)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="also write the rows as JSON on stdout")] = False,
) -> None:
    """fp32, dynamic and static int8 from the same weights: macro-F1 per call and batched, agreement, batch drift,
    latency and throughput on one thread."""
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"--checkpoint {checkpoint}: no config.json; pass a directory written by save_pretrained")
    examples = load_examples(data).examples
    calibration_texts = [ex.text for ex in load_examples(calibration_data).examples]
    # Heavy imports (torch via the export code) only after the inputs are checked.
    from guardloop.bench.quantization import run_quantization_bench
    from guardloop.trainer.export import Calibration

    calibrations = {"default": Calibration()}
    if compare_calibrations:
        calibrations |= {
            "minmax-100": Calibration(texts=100),
            "minmax-300": Calibration(texts=300),
            "movavg": Calibration(moving_average=True),
        }
    settings = load_settings()
    rows = run_quantization_bench(
        checkpoint,
        examples,
        calibration_texts,
        work_dir,
        calibrations=calibrations,
        max_seq_len=settings.max_seq_len,  # as served
        echo=lambda line: typer.echo(line, err=as_json),
    )
    if as_json:
        typer.echo(json.dumps(rows))


@bench_app.command("neighbours")
@friendly_errors
def bench_neighbours(
    seconds: Annotated[float, typer.Option(min=1, help="length of each phase (light alone, light beside)")] = 20,
    p99_ratio: Annotated[float, typer.Option(min=1, help="largest light p99 beside the others, in p99s alone")] = 5,
    heavy_wait_ratio: Annotated[
        float, typer.Option(min=1, help="longest heavy wait, in one heavy request's time on an idle service")
    ] = 2.5,
    registry_dir: Annotated[Path | None, typer.Option(help="whose current model to run (default: settings)")] = None,
) -> None:
    """A light one-text client alone, then beside two heavy clients (largest legal requests) and a hostile one
    (malformed requests): its p50/p99 and failures side by side, and what the others got. Exit 1 on a missed target."""
    settings = load_settings()
    met = run_neighbours_bench(
        settings=settings,
        registry_dir=registry_dir or settings.registry_dir,
        seconds=seconds,
        p99_ratio=p99_ratio,
        heavy_wait_ratio=heavy_wait_ratio,
    )
    if not met:
        raise typer.Exit(1)


@bench_app.command("policy")
@friendly_errors
def bench_policy(
    policy: Annotated[Path | None, typer.Option(help="policy file (default: settings' policy_path)")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="passes over the texts; the median pass is reported")] = 50,
) -> None:
    """What a tenant policy adds per classified text (tenant lookup, decision, metrics), beside the forward pass."""
    settings = load_settings()
    run_policy_bench(
        settings.registry_dir, policy or settings.policy_path, repeats=repeats, max_seq_len=settings.max_seq_len
    )


@bench_app.command("label-check")
@friendly_errors
def bench_label_check(
    queue_file: Annotated[Path, typer.Option("--queue", help="labeled file the simulated review queue is drawn from")],
    queue_size: Annotated[int, typer.Option(min=10, help="labels in the simulated queue")] = 500,
    flips: Annotated[int, typer.Option(min=1, help="of them deliberately given a wrong label")] = 50,
    seeds: Annotated[int, typer.Option(min=1, help="repeat with seeds 0..N-1 (other draws and flips)")] = 3,
    base: Annotated[list[Path] | None, typer.Option(help="base training files (default: settings' base set)")] = None,
) -> None:
    """How many deliberately flipped labels the suspected-mislabel check (run before each training) catches, and
    how many untouched labels it flags by mistake."""
    settings = load_settings()
    run_label_check_bench(
        base_files=base or base_files(settings),
        queue_file=queue_file,
        queue_size=queue_size,
        flips=flips,
        seeds=range(seeds),
        folds=settings.label_check_folds,
        max_share=settings.label_check_max_share,
        cache_dir=settings.data_dir / "cache",
    )

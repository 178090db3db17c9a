"""The guardloop command line: user errors are one line and a non-zero exit; jobs do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from guardloop.models.registry import ModelRegistry

from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_DIR
from tests.tiny_onnx import publish_tiny

SEED = SEED_DIR


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardloop.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {"GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"), "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_label_in_a_training_file(tmp_path, cli_env):
    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\nhello there\tnot-harmful\nbuy stocks?\tstonks\n", encoding="utf-8")
    result = run_cli("train", "--data", str(data), env=cli_env)
    assert_one_line_error(result, f"{data}:3", "stonks", "emergency-situation")
    assert ModelRegistry(tmp_path / "registry").versions() == []


def test_missing_data_file(tmp_path, cli_env):
    result = run_cli("train", "--data", str(tmp_path / "nope.tsv"), env=cli_env)
    assert_one_line_error(result, "nope.tsv", "no such file")


def test_unlabeled_without_teacher_is_refused(tmp_path, cli_env):
    result = run_cli("train", "--data", str(SEED / "train.jsonl"), "--unlabeled", str(SEED / "eval.jsonl"), env=cli_env)
    assert_one_line_error(result, "--teacher")


def test_eval_without_a_model(cli_env):
    result = run_cli("eval", "--data", str(SEED / "eval.jsonl"), env=cli_env)
    assert_one_line_error(result, "no current model")


def test_bad_setting_is_one_line(cli_env):
    result = run_cli("models", "list", env={**cli_env, "GUARDLOOP_PORT": "not-a-port"})
    assert_one_line_error(result, "GUARDLOOP_PORT: should be a valid integer", "not-a-port")


def test_models_list_promote_rollback_show(tmp_path, cli_env):
    registry = ModelRegistry(tmp_path / "registry")
    first = publish_tiny(registry, tmp_path, favour="self-harm")
    second = publish_tiny(registry, tmp_path, favour="legal-advice")

    listing = run_cli("models", "list", env=cli_env)
    assert listing.returncode == 0
    assert f"* {second}" in listing.stdout and f"  {first}" in listing.stdout

    assert run_cli("models", "promote", first, env=cli_env).returncode == 0
    assert registry.current() == first
    assert run_cli("models", "rollback", env=cli_env).returncode == 0
    assert registry.current() == second

    card = json.loads(run_cli("models", "show", first, env=cli_env).stdout)
    assert card["version"] == first and card["labels"] == list(LABELS)

    assert_one_line_error(run_cli("models", "promote", "../../etc", env=cli_env), "../../etc")
    assert_one_line_error(run_cli("models", "promote", "v-does-not-exist", env=cli_env), "v-does-not-exist")
    assert registry.current() == second


def test_eval_json_reports_the_metrics(tmp_path, cli_env):
    registry = ModelRegistry(tmp_path / "registry")
    version = publish_tiny(registry, tmp_path, favour="legal-advice")
    data = tmp_path / "eval.csv"
    data.write_text("message,category\nmy landlord kept my deposit,legal\nI feel fine,discard\n", encoding="utf-8")
    result = run_cli("eval", "--data", str(data), "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model_version"] == version
    assert report["accuracy"] == 0.5  # the tiny model always answers legal-advice
    assert report["per_class_f1"]["legal-advice"] == pytest.approx(2 / 3)
    assert report["macro_f1"] == pytest.approx((2 / 3) / 6)
    assert report["confusion_matrix"][LABELS.index("not-harmful")][LABELS.index("legal-advice")] == 1


def test_yaml_config_file_and_env_precedence(tmp_path, monkeypatch):
    from guardloop.core.settings import Settings

    config = tmp_path / "guardloop.yaml"
    config.write_text("max_texts: 7\nport: 9001\n", encoding="utf-8")
    monkeypatch.setenv("GUARDLOOP_CONFIG", str(config))
    monkeypatch.setenv("GUARDLOOP_PORT", "9002")
    settings = Settings()
    assert settings.max_texts == 7
    assert settings.port == 9002
    monkeypatch.setenv("GUARDLOOP_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match=r"missing\.yaml"):
        Settings()


@pytest.mark.slow
def test_train_exports_verifies_and_publishes_a_real_model(tmp_path, cli_env):
    """Real fine-tune of all-MiniLM-L6-v2 on a slice of the seed data, optimum export, int8, publish, eval."""
    lines = (SEED / "train.jsonl").read_text(encoding="utf-8").splitlines()
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines[::3]) + "\n", encoding="utf-8")
    result = run_cli(
        "train",
        "--data",
        str(small),
        "--dev",
        str(SEED / "eval.jsonl"),
        "--epochs",
        "3",
        "--learning-rate",
        "1e-4",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    version = result.stdout.strip().splitlines()[-1]
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.current() == version
    card = registry.card(version)
    assert card.quantization == "int8-dynamic-per-channel"
    assert card.metrics["onnx_check"]["agreement"] >= 0.9
    assert str(small) in card.data and card.data[str(small)].startswith("sha256:")
    assert (registry.path(version) / "model.onnx").stat().st_size < 40_000_000  # int8, not fp32 (~90 MB)
    report = json.loads(run_cli("eval", "--data", str(SEED / "eval.jsonl"), "--json", env=cli_env).stdout)
    assert report["model_version"] == version
    assert report["macro_f1"] > 0.5  # far above chance (1/6) after two epochs


def test_serve_runs_with_the_thread_switch_interval_it_is_given(tmp_path, monkeypatch):
    """GUARDLOOP_GIL_SWITCH_INTERVAL_MS reaches the serving process before uvicorn starts (uvicorn.run is replaced
    by a recorder: the setting is what is checked, not a server)."""
    from typer.testing import CliRunner

    from guardloop.cli import serve as serve_command
    from guardloop.cli.app import app
    from tests.conftest import free_port

    publish_tiny(ModelRegistry(tmp_path / "registry"), tmp_path)
    for name, value in {
        "GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"),
        "GUARDLOOP_DATA_DIR": str(tmp_path / "data"),
        "GUARDLOOP_PORT": str(free_port()),
        "GUARDLOOP_GIL_SWITCH_INTERVAL_MS": "0.3",
    }.items():
        monkeypatch.setenv(name, value)
    seen: list[float] = []
    monkeypatch.setattr(serve_command.uvicorn, "run", lambda *args, **kwargs: seen.append(sys.getswitchinterval()))
    before = sys.getswitchinterval()
    try:
        result = CliRunner().invoke(app, ["serve", "--no-bootstrap"])
    finally:
        sys.setswitchinterval(before)
    assert result.exit_code == 0, result.output
    assert seen == [pytest.approx(0.0003)]

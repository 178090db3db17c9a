"""Operator mistakes stop the real CLI process with one line naming the setting and what to fix, exit code 2 and
no traceback, before any model is loaded or trained; a GUARDLOOP_* variable that no setting reads is a warning
naming the closest setting."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error, run_cli

BAD_CRON = "61 * * * *"
# (id, extra environment, command line, fragments the one line must hold). {tmp} is the test's directory.
MISTAKES = [
    ("thresholds not JSON", {"GUARDLOOP_THRESHOLDS": "self-harm=0.3"}, ["serve"],
     ["GUARDLOOP_THRESHOLDS: not valid JSON", """'{"self-harm": 0.3}'"""]),
    ("thresholds wrong type", {"GUARDLOOP_THRESHOLDS": '{"self-harm": "high"}'}, ["serve"],
     ["GUARDLOOP_THRESHOLDS at self-harm: should be a valid number", "'high'"]),
    ("thresholds a list", {"GUARDLOOP_THRESHOLDS": "[0.3]"}, ["serve"],
     ["GUARDLOOP_THRESHOLDS: should be a valid dictionary", '{"self-harm": 0.3}']),
    ("thresholds unknown label", {"GUARDLOOP_THRESHOLDS": '{"violence": 0.3}'}, ["serve"],
     ["GUARDLOOP_THRESHOLDS: unknown label 'violence'", "emergency-situation"]),
    ("api keys not JSON", {"GUARDLOOP_API_KEYS": "bot:s3cret-key"}, ["serve"],
     ["GUARDLOOP_API_KEYS: not valid JSON", "JSON object"]),
    ("cors origins not JSON", {"GUARDLOOP_CORS_ORIGINS": "https://a.example"}, ["serve"],
     ["GUARDLOOP_CORS_ORIGINS: not valid JSON", "JSON array"]),
    ("two bad numbers", {"GUARDLOOP_MAX_TEXTS": "0", "GUARDLOOP_ONNX_THREADS": "many"}, ["serve"],
     ["GUARDLOOP_MAX_TEXTS: should be greater than or equal to 1", "| GUARDLOOP_ONNX_THREADS: should be a valid"]),
    ("config file missing", {"GUARDLOOP_CONFIG": "{tmp}/missing.yaml"}, ["serve"],
     ["GUARDLOOP_CONFIG: {tmp}/missing.yaml does not exist"]),
    ("config file broken", {"GUARDLOOP_CONFIG": "{tmp}/broken.yaml"}, ["serve"],
     ["GUARDLOOP_CONFIG: {tmp}/broken.yaml is not valid YAML", "line 2, column 7"]),
    ("config file a list", {"GUARDLOOP_CONFIG": "{tmp}/list.yaml"}, ["serve"],
     ["GUARDLOOP_CONFIG: {tmp}/list.yaml holds a list, not settings"]),
    ("config file unknown key", {"GUARDLOOP_CONFIG": "{tmp}/unknown.yaml"}, ["serve"],
     ["GUARDLOOP_CONFIG: {tmp}/unknown.yaml: unknown setting 'prot'; did you mean 'port'?"]),
    ("config file bad value", {"GUARDLOOP_CONFIG": "{tmp}/bad_value.yaml"}, ["serve"],
     ["GUARDLOOP_CONFIG: {tmp}/bad_value.yaml: max_texts: should be greater than or equal to 1", "fix it in the file"]),
    ("database url on serve", {"GUARDLOOP_DATABASE_URL": "garbage"}, ["serve"],
     ["GUARDLOOP_DATABASE_URL: database URL is not a URL", "postgresql+psycopg://"]),
    ("database url on trainer", {"GUARDLOOP_DATABASE_URL": "garbage"}, ["trainer"], ["GUARDLOOP_DATABASE_URL"]),
    ("database url on pool", {"GUARDLOOP_DATABASE_URL": "mysql://u@h/db"}, ["pool", "stats"],
     ["GUARDLOOP_DATABASE_URL: unsupported database 'mysql'"]),
    ("cron with --with-trainer", {"GUARDLOOP_CYCLE_CRON": BAD_CRON}, ["serve", "--with-trainer"],
     ["GUARDLOOP_CYCLE_CRON: '61 * * * *' is not a crontab line", "'0 3 * * *'"]),
    ("cron on trainer", {"GUARDLOOP_CYCLE_CRON": "every night"}, ["trainer"], ["GUARDLOOP_CYCLE_CRON"]),
    ("switch interval zero", {"GUARDLOOP_GIL_SWITCH_INTERVAL_MS": "0"}, ["serve"],
     ["GUARDLOOP_GIL_SWITCH_INTERVAL_MS: should be greater than 0"]),
    ("workers zero", {"GUARDLOOP_WORKERS": "0"}, ["serve"],
     ["GUARDLOOP_WORKERS: should be greater than or equal to 1"]),
    ("workers with --with-trainer", {"GUARDLOOP_WORKERS": "2"}, ["serve", "--with-trainer"],
     ["GUARDLOOP_WORKERS=2 asks for several", "run `guardloop trainer` beside `guardloop serve`"]),
    ("metrics folder is a file", {"PROMETHEUS_MULTIPROC_DIR": "{tmp}/broken.yaml"}, ["serve"],
     ["PROMETHEUS_MULTIPROC_DIR: cannot use", "name a writable folder or unset PROMETHEUS_MULTIPROC_DIR"]),
    ("port out of range", {"GUARDLOOP_PORT": "70000"}, ["serve"],
     ["GUARDLOOP_PORT: should be less than or equal to 65535", "'70000'"]),
    ("--port out of range", {}, ["serve", "--port", "70000"], ["--port: port 70000 is out of range"]),
    ("host unknown", {"GUARDLOOP_HOST": "no-such-host.invalid"}, ["serve"], ["GUARDLOOP_HOST: cannot listen on"]),
]  # fmt: skip


@pytest.fixture
def operator_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "broken.yaml").write_text("port: [8000\n  host: x: y\n", encoding="utf-8")
    (tmp_path / "list.yaml").write_text("- port\n- 8000\n", encoding="utf-8")
    (tmp_path / "unknown.yaml").write_text("prot: 8000\n", encoding="utf-8")
    (tmp_path / "bad_value.yaml").write_text("max_texts: 0\n", encoding="utf-8")
    # An empty registry: a command that got past its checks would start training a bootstrap model (minutes).
    return {"GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"), "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}


@pytest.mark.parametrize(("case", "env", "args", "fragments"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_an_operator_mistake_is_one_line_and_exit_2(tmp_path, operator_env, case, env, args, fragments):
    env = {key: value.replace("{tmp}", str(tmp_path)) for key, value in env.items()}
    result = run_cli(*args, env=operator_env | env, timeout=60)
    assert_one_line_error(result, *(fragment.replace("{tmp}", str(tmp_path)) for fragment in fragments))
    assert "s3cret-key" not in result.stderr  # a secret's value is never echoed
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())  # nothing trained


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_port_in_use_names_the_setting_to_change(operator_env, busy_port):
    result = run_cli("serve", env=operator_env | {"GUARDLOOP_PORT": str(busy_port)}, timeout=60)
    assert_one_line_error(
        result, f"GUARDLOOP_PORT: port {busy_port} is in use on 127.0.0.1; choose another with --port or GUARDLOOP_PORT"
    )
    result = run_cli("serve", "--port", str(busy_port), env=operator_env, timeout=60)
    assert_one_line_error(result, f"--port: port {busy_port} is in use")
    result = run_cli("trainer", env=operator_env | {"GUARDLOOP_TRAINER_METRICS_PORT": str(busy_port)}, timeout=60)
    assert_one_line_error(result, f"GUARDLOOP_TRAINER_METRICS_PORT: port {busy_port} is in use")


def test_an_unknown_guardloop_variable_is_a_warning_naming_the_closest_setting(tmp_path, operator_env):
    env = operator_env | {"GUARDLOOP_TRESHOLDS": '{"self-harm": 0.3}', "GUARDLOOP_ZZZZZZ": "1"}
    result = run_cli("pool", "stats", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: GUARDLOOP_TRESHOLDS is not a guardloop setting and is ignored; did you mean GUARDLOOP_THRESHOLDS?",
        "warning: GUARDLOOP_ZZZZZZ is not a guardloop setting and is ignored; see the Configuration section of the "
        "README",
    ]
    assert "Traceback" not in result.stderr

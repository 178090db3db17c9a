""".ci/run sets CI=true itself: a local run of the CI script fails on a missing service (PostgreSQL, Chromium,
promtool) the way CI does, instead of skipping its tests (tests/conftest.py, `unavailable`)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_the_ci_script_runs_the_tests_with_ci_true_whatever_the_caller_set(tmp_path):
    # Stand-ins on PATH: the services count as present (nothing is started or installed), and `make` only reports
    # the CI variable the test command would run under.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub(stubs, "make", 'echo "make $* CI=${CI-unset}"')
    for name in ("pg_isready", "chromium", "promtool"):
        stub(stubs, name, "exit 0")
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    for caller_ci in (None, "false"):
        if caller_ci is not None:
            env["CI"] = caller_ci
        env["PATH"] = f"{stubs}:/usr/bin:/bin"
        run = subprocess.run(
            ["bash", str(REPO_ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1] == "make test CI=true", (caller_ci, run.stdout, run.stderr)

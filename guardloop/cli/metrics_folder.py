"""PROMETHEUS_MULTIPROC_DIR checked before anything imports the metrics.

prometheus-client opens a file in that folder for every metric it creates, at import time: a folder that is
missing or not writable would end any `guardloop` command in a traceback from an import. Standard library only,
since it runs before the rest of the command line is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def metrics_folder_problem() -> str | None:
    """Why the folder cannot hold metric files, or None; a missing folder is created."""
    given = os.environ.get(VARIABLE)
    if not given:
        return None
    folder = Path(given)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{VARIABLE}: cannot use {given!r} as the metrics folder ({exc.strerror or exc})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{VARIABLE}: {given!r} is not writable by this process"
    return None


def exit_on_a_bad_metrics_folder() -> None:
    if problem := metrics_folder_problem():
        print(f"error: {problem}; name a writable folder or unset {VARIABLE}", file=sys.stderr)
        raise SystemExit(2)

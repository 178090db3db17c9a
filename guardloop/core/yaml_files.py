"""Reading an operator's YAML file (guideline library, tenant policy, label definitions) with one kind of error:
a line naming the file and what is wrong (unreadable, too large, not UTF-8, not YAML and where)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """The file cannot be read as YAML; the message names the file and the place."""


def read_yaml(path: Path, *, max_bytes: int) -> Any:
    """The parsed content of `path`; YamlFileError for every way the file itself can be wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise YamlFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise YamlFileError(f"{path}: {len(raw)} bytes, more than {max_bytes}; is this the right file?")
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlFileError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None

"""The optional YAML settings file that GUARDLOOP_CONFIG names: read, and every way it can be wrong named in one line.

Its own module because the settings class reads it while it loads, and the one-line error messages for settings
(settings_errors) need the settings class: neither has to import the other's module to do its job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from guardloop.core.errors import UserError

PREFIX = "GUARDLOOP_"
CONFIG_VAR = "GUARDLOOP_CONFIG"


class ConfigFileError(UserError, ValueError):
    """GUARDLOOP_CONFIG names a file that is missing, unreadable, not YAML, or not a mapping of settings."""


def env_name(field: str) -> str:
    return f"{PREFIX}{field.upper()}"


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in the YAML file GUARDLOOP_CONFIG names; every way it can be wrong is a ConfigFileError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigFileError(f"{CONFIG_VAR}: {path} does not exist; point it at a YAML file of settings or unset it")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"{CONFIG_VAR}: cannot read {path} ({exc.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"{CONFIG_VAR}: {path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigFileError(f"{CONFIG_VAR}: {path} is not valid YAML ({problem}{where}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{CONFIG_VAR}: {path} holds a {type(data).__name__}, not settings; write one 'name: value' per line"
        )
    return data

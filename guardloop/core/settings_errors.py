"""Operator mistakes in the settings, each as the one line the CLI prints ("GUARDLOOP_PORT: ...; ..."), instead
of pydantic's multi-line dump; and a warning for a GUARDLOOP_* variable that is no setting (a typo that would
otherwise be ignored in silence).

Secrets (API keys, tokens, the database URL) are never echoed: a line names the setting, never its value.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from guardloop.core.config_file import CONFIG_VAR, PREFIX, ConfigFileError, env_name, read_config_file
from guardloop.core.settings import Settings

# GUARDLOOP_* variables read by something other than the settings class.
NOT_SETTINGS = frozenset({"GUARDLOOP_TEST_POSTGRES", "GUARDLOOP_BENCH_API_KEY"})
# What a JSON-valued setting looks like, for the line that says how to write it.
JSON_EXAMPLES = {
    "thresholds": '{"self-harm": 0.3}',
    "api_keys": '{"chatbot": "<key>"}',
    "cors_origins": '["https://app.example.com"]',
    "train_data": '["data/extra.jsonl"]',
}
_MAX_ECHO = 60  # longer values are not repeated in the line


def _secret_fields(model: type) -> set[str]:
    fields = getattr(model, "model_fields", {})
    return {name for name, info in fields.items() if "SecretStr" in repr(info.annotation)}


def _closest(name: str, fields: list[str]) -> str | None:
    """The field `name` most likely meant (compared without the GUARDLOOP_ prefix, which every name shares)."""
    key = name.lower().removeprefix(PREFIX.lower())
    matches = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
    return matches[0] if matches else None


def _config_keys(environ: Mapping[str, str]) -> tuple[str | None, set[str]]:
    path = environ.get(CONFIG_VAR)
    if not path:
        return None, set()
    try:
        return path, set(read_config_file(path))
    except ConfigFileError:
        return path, set()


def _echo(value: Any) -> str:
    if isinstance(value, SecretStr) or not isinstance(value, str | int | float | bool) or value is None:
        return ""
    text = repr(value)
    return f" (got {text})" if len(text) <= _MAX_ECHO else ""


def _problem(error: Mapping[str, Any], model: type, environ: Mapping[str, str]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else "settings"
    inner = f" at {'.'.join(loc[1:])}" if len(loc) > 1 else ""
    fields = list(getattr(model, "model_fields", {}))
    config_path, config_keys = _config_keys(environ)
    if error.get("type") == "extra_forbidden":
        guess = _closest(field, fields)
        hint = f"did you mean {guess!r}?" if guess else "see the Configuration section of the README"
        where = f"{CONFIG_VAR}: {config_path}" if field in config_keys else "settings"
        return f"{where}: unknown setting {field!r}; {hint}"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ").replace("Input should", "should")
    value = error.get("input")
    echoed = "" if field in _secret_fields(model) or str(value) in message else _echo(value)
    name = env_name(field)
    example = f" (e.g. {JSON_EXAMPLES[field]})" if field in JSON_EXAMPLES and not inner else ""
    if name not in environ and field in config_keys:
        return f"{CONFIG_VAR}: {config_path}: {field}{inner}: {message}{echoed}; fix it in the file{example}"
    return f"{name}{inner}: {message}{echoed}; fix or unset {name}{example}"


def describe_settings_error(exc: BaseException, environ: Mapping[str, str] | None = None) -> str | None:
    """One line naming the setting and what to fix, for an error raised while building Settings; None for
    any other error."""
    environ = os.environ if environ is None else environ
    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        return " | ".join(_problem(error, Settings, environ) for error in exc.errors())
    if isinstance(exc, SettingsError):
        found = re.search(r'field "([^"]+)"', str(exc))
        if found is None:
            return str(exc)
        field = found.group(1)
        cause = exc.__cause__
        reason = (
            f"not valid JSON ({cause.msg} at column {cause.colno})"
            if isinstance(cause, json.JSONDecodeError)
            else str(cause or exc)
        )
        example = JSON_EXAMPLES.get(field)
        shape = "a JSON array" if "list" in repr(Settings.model_fields[field].annotation) else "a JSON object"
        fix = f"write {shape}, e.g. {env_name(field)}='{example}'" if example else f"write {shape}"
        return f"{env_name(field)}: {reason}; {fix}"
    return None


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per GUARDLOOP_* variable that no setting reads, naming the closest setting."""
    environ = os.environ if environ is None else environ
    fields = list(Settings.model_fields)
    known = {env_name(field) for field in fields}
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith(PREFIX) or name.upper() in NOT_SETTINGS | known:
            continue
        guess = _closest(name, fields)
        hint = f"did you mean {env_name(guess)}?" if guess else "see the Configuration section of the README"
        warnings.append(f"{name} is not a guardloop setting and is ignored; {hint}")
    return warnings

"""Tenant policies: one guard, several chatbots with different risk appetites.

A policy file (YAML, versioned) names tenants and, for each, the API-key clients it covers, its per-category
thresholds, a review band per category (a score from `review` up to the threshold is "review": the chatbot may
answer softly and a person looks at it), categories it does not care about (never flagged for it), the guideline
library its guidance comes from, and whether its traffic may enter the pool. Callers no tenant names get the
file's `default` policy; without a file, everyone gets today's behaviour (the model's thresholds, no band).

This module only reads and validates the file; the service applies it (service/decisions.py) and reloads it
(service/policy_store.py), `guardloop calibrate --tenant` writes thresholds for it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guardloop.core.labels import HARMFUL_LABELS, SAFE_LABEL, UnknownLabelError, parse_label
from guardloop.core.yaml_files import YamlFileError, read_yaml

DEFAULT_POLICY = "default"
# What a tenant's policy decides per category and overall (service/decisions.py), in rising order.
ALLOW, REVIEW, BLOCK = "allow", "review", "block"
DECISIONS: tuple[str, ...] = (ALLOW, REVIEW, BLOCK)
OVERALL = "overall"  # the category value of the overall decision in the per-tenant metric
# Tenant names become metric label values and pool column values: short, plain, and from this file only.
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# A note, not a hard limit of YAML: a policy file this large is almost certainly the wrong file.
MAX_POLICY_BYTES = 1_048_576


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file and what to fix."""


def _harmful(raw: str) -> str:
    try:
        label = parse_label(raw)
    except UnknownLabelError:
        raise ValueError(f"unknown category {raw!r}; use one of {', '.join(HARMFUL_LABELS)}") from None
    if label == SAFE_LABEL:
        raise ValueError(f"{SAFE_LABEL!r} is never flagged; name a harmful category ({', '.join(HARMFUL_LABELS)})")
    return label


def _scores_by_category(value: dict[str, float], what: str) -> dict[str, float]:
    checked: dict[str, float] = {}
    for raw, score in value.items():
        label = _harmful(raw)
        if label in checked:
            raise ValueError(f"{label!r} appears twice (as {raw!r})")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"{what} of {label!r} is {score}; it must lie in 0..1")
        checked[label] = float(score)
    return checked


class TenantPolicy(BaseModel):
    """What one tenant (or everyone else: `default`) gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: list[str] = Field(
        default_factory=list, description="API-key client names (the keys of the api_keys setting) of this tenant"
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="category -> score at which it is blocked; unset: the model's threshold"
    )
    review: dict[str, float] = Field(
        default_factory=dict, description="category -> lowest score of its review band (up to the threshold)"
    )
    ignore: list[str] = Field(default_factory=list, description="categories never flagged (nor reviewed) for it")
    guidelines: Path | None = Field(
        None, description="guideline library file (relative paths: from the policy file); unset: the service's"
    )
    pool: bool = Field(True, description="whether its traffic may enter the pool (sampled and review-band texts)")

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        return _scores_by_category(value, "threshold")

    @field_validator("review")
    @classmethod
    def _check_review(cls, value: dict[str, float]) -> dict[str, float]:
        return _scores_by_category(value, "review band start")

    @field_validator("ignore")
    @classmethod
    def _check_ignore(cls, value: list[str]) -> list[str]:
        return sorted({_harmful(raw) for raw in value}, key=HARMFUL_LABELS.index)

    @field_validator("clients")
    @classmethod
    def _check_clients(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("client names must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TenantPolicy:
        for label, start in self.review.items():
            threshold = self.thresholds.get(label)
            if threshold is not None and start >= threshold:
                raise ValueError(
                    f"review band of {label!r} starts at {start}, not below its threshold {threshold}; "
                    "the band runs from its start up to the threshold"
                )
        contradicted = sorted(set(self.ignore) & (set(self.thresholds) | set(self.review)))
        if contradicted:
            raise ValueError(
                f"{', '.join(contradicted)} both ignored and given a threshold or review band; keep one of them"
            )
        return self


class PolicyFile(BaseModel):
    """A whole policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1, max_length=64, description="reported with every answer it decided")
    default: TenantPolicy = Field(default_factory=TenantPolicy, description="for every caller no tenant names")
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_and_clients(self) -> PolicyFile:
        if self.default.clients:
            raise ValueError("default.clients: the default policy covers every other caller; list no clients")
        owner: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            if name == DEFAULT_POLICY or not TENANT_NAME.match(name):
                raise ValueError(
                    f"tenant name {name!r}: use 1-64 lower-case letters, digits, '-' or '_' (not {DEFAULT_POLICY!r})"
                )
            if not tenant.clients:
                raise ValueError(f"tenants.{name}.clients: list the API-key client names of this tenant")
            for client in tenant.clients:
                if client in owner:
                    raise ValueError(f"client {client!r} is in tenants {owner[client]} and {name}; give it one tenant")
                owner[client] = name
        return self

    def policies(self) -> dict[str, TenantPolicy]:
        """Every named policy, the default one included."""
        return {DEFAULT_POLICY: self.default, **self.tenants}


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "file"
        problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def parse_policy(data: Any, source: str) -> PolicyFile:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with 'version' and 'tenants', got {type(data).__name__}")
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{source}: {_describe(exc)}") from None


def load_policy_file(path: Path) -> PolicyFile:
    """Read and validate a policy file; every problem is one PolicyError naming the file and the place."""
    try:
        data = read_yaml(path, max_bytes=MAX_POLICY_BYTES)
    except YamlFileError as exc:
        raise PolicyError(str(exc)) from None
    return parse_policy(data, str(path))


def library_path(policy_file: Path, library: Path) -> Path:
    """Where a tenant's `guidelines` file is: relative paths are read from the policy file's folder."""
    return library if library.is_absolute() else policy_file.parent / library

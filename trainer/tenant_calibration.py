"""`guardloop calibrate --tenant NAME`: a tenant's thresholds from the labels reviewers gave its traffic.

The examples are the tenant's pool items with a settled label: mostly texts from its review band (requested
for review the moment they were classified, service/pool_writer.py), plus any of its traffic a cycle picked.
They are tuned with the same rules as a model's thresholds (trainer/calibrate.py), starting from the
thresholds the tenant decides with now (its policy's, else the model's), and the result is a policy snippet;
with `write_policy` it replaces the tenant's thresholds in the policy file, which services reload by themselves.

Band texts lie near the thresholds by construction, so the precision and recall printed are those of the
borderline traffic reviewers saw, not of all traffic: they say where the line should be, not how often it is hit.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from guardloop.core.errors import UserError
from guardloop.core.policy import DEFAULT_POLICY, PolicyError, load_policy_file, parse_policy
from guardloop.storage import Database, PoolRepository, ReviewRepository


@dataclass(frozen=True)
class TenantExamples:
    texts: list[str]
    labels: list[str]


def tenant_examples(database: Database, tenant: str, *, reviews: ReviewRepository) -> TenantExamples:
    """The settled labels of `tenant`'s pool items, oldest first."""
    pool = PoolRepository(database)
    ids = {item.id for item in pool.iter_items(requested_only=True) if item.tenant == tenant}
    finals = [final for final in reviews.final_labels() if final.item_id in ids]
    return TenantExamples([final.text for final in finals], [final.label for final in finals])


def tenant_thresholds(policy_path: Path | None, tenant: str) -> dict[str, float]:
    """The thresholds `tenant`'s policy sets itself (the model's apply to the others); UserError for an unknown
    tenant or a policy file that does not load."""
    if policy_path is None:
        if tenant != DEFAULT_POLICY:
            raise UserError(f"--tenant {tenant}: no policy file is configured (set GUARDLOOP_POLICY_PATH)")
        return {}
    try:
        policies = load_policy_file(policy_path).policies()
    except PolicyError as exc:
        raise UserError(str(exc)) from None
    if tenant not in policies:
        raise UserError(f"--tenant {tenant}: not in {policy_path}; its policies are {', '.join(sorted(policies))}")
    return dict(policies[tenant].thresholds)


def policy_snippet(tenant: str, thresholds: dict[str, float], comment: str) -> str:
    """The YAML lines to put into the policy file for `tenant`: its thresholds."""
    entry = {"thresholds": {label: round(value, 4) for label, value in thresholds.items()}}
    body = {DEFAULT_POLICY: entry} if tenant == DEFAULT_POLICY else {"tenants": {tenant: entry}}
    return f"# {comment}\n" + yaml.safe_dump(body, sort_keys=False)


def write_policy(policy_path: Path, tenant: str, thresholds: dict[str, float], *, version: str | None = None) -> str:
    """Replace `tenant`'s thresholds in the policy file (a new version), atomically; returns the new version.

    The result is validated before the file is replaced, so a running service never sees a half-written or
    invalid file. The file is rewritten from its data: YAML comments are not kept.
    """
    try:
        data: dict[str, Any] = yaml.safe_load(policy_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{policy_path}: cannot read it back ({exc})") from None
    new_version = version or f"{datetime.now(UTC):%Y%m%d-%H%M%S}-calibrated-{tenant}"[:64]
    entry = data.setdefault(DEFAULT_POLICY, {}) if tenant == DEFAULT_POLICY else data["tenants"][tenant]
    entry["thresholds"] = {label: round(value, 4) for label, value in thresholds.items()}
    # A review band must start below its new threshold; a band the new threshold passed shrinks to nothing.
    review = entry.get("review") or {}
    for label, start in list(review.items()):
        if label in entry["thresholds"] and start >= entry["thresholds"][label]:
            del review[label]
    data["version"] = new_version
    try:
        parse_policy(data, str(policy_path))
    except PolicyError as exc:
        raise UserError(f"the calibrated policy would not load, nothing written: {exc}") from None
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    handle, temporary = tempfile.mkstemp(dir=policy_path.parent, prefix=f".{policy_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, policy_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return new_version

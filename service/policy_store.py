"""The tenant policies the service decides with, reloaded when the operator's file changes.

The same discipline as the guideline library (service/guideline_store.py): the policy file and the guideline
libraries it names are polled by stat; a changed file is parsed and validated, libraries included, before one
reference is replaced; a file that does not validate is refused (logged, counted in
guardloop_policy_reloads_total{outcome="refused"}, kept for GET /policies) and the previous policy keeps deciding.
Unlike a guideline library, a broken policy file at start-up stops the service: starting on the default policy
would silently lift a tenant's stricter thresholds (a rolling update keeps the old replicas serving meanwhile).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from guardloop.service.decisions import AppliedPolicy

from guardloop.core import telemetry
from guardloop.core.guidance import GuidelineError, GuidelineLibrary, load_library
from guardloop.core.policy import DEFAULT_POLICY, PolicyError, PolicyFile, TenantPolicy, library_path, load_policy_file

log = logging.getLogger(__name__)

BUILTIN_VERSION = "builtin"  # the policy version reported when no policy file is configured

# (inode, size, mtime in ns) of each watched file; None for a missing one (see guideline_store._signature).
Signature = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class Policies:
    """One loaded policy file, indexed for the request path."""

    version: str
    source: str  # the file, or "builtin"
    loaded_at: datetime
    default: AppliedPolicy
    by_name: dict[str, AppliedPolicy]
    by_client: dict[str, AppliedPolicy]
    file: PolicyFile | None = None
    library_files: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def for_client(self, client: str | None) -> AppliedPolicy:
        return self.by_client.get(client, self.default) if client else self.default


@dataclass(frozen=True)
class RefusedPolicy:
    source: str
    reason: str
    at: datetime


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)  # follows symlinks: a ConfigMap swap changes the target's inode
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _applied(name: str, version: str, tenant: TenantPolicy, library: GuidelineLibrary | None) -> AppliedPolicy:
    return AppliedPolicy(
        name=name,
        version=version,
        thresholds=dict(tenant.thresholds),
        review_from=dict(tenant.review),
        ignored=frozenset(tenant.ignore),
        pool=tenant.pool,
        guidelines=library,
        counters=telemetry.decision_counters(name),
    )


def builtin_policies() -> Policies:
    """No policy file: everyone gets today's behaviour."""
    default = _applied(DEFAULT_POLICY, BUILTIN_VERSION, TenantPolicy(), None)
    return Policies(BUILTIN_VERSION, "builtin", datetime.now(UTC), default, {DEFAULT_POLICY: default}, {})


def read_policies(path: Path, known_clients: Collection[str] = ()) -> Policies:
    """Read, validate and index a policy file and the guideline libraries it names; PolicyError on any problem."""
    policy_file = load_policy_file(path)
    libraries: dict[Path, GuidelineLibrary] = {}
    applied: dict[str, AppliedPolicy] = {}
    for name, tenant in policy_file.policies().items():
        library = None
        if tenant.guidelines is not None:
            where = library_path(path, tenant.guidelines)
            if where not in libraries:
                try:
                    libraries[where] = load_library(where)
                except GuidelineError as exc:
                    raise PolicyError(f"{path}: {name}.guidelines: {exc}") from None
            library = libraries[where]
        applied[name] = _applied(name, policy_file.version, tenant, library)
    by_client = {client: applied[name] for name, tenant in policy_file.tenants.items() for client in tenant.clients}
    warnings = []
    if policy_file.tenants and not known_clients:
        warnings.append("no API keys are configured: every caller gets the default policy (set api_keys)")
    elif unknown := sorted(set(by_client) - set(known_clients)):
        warnings.append(f"clients without an API key never match their tenant: {', '.join(unknown)}")
    return Policies(
        version=policy_file.version,
        source=str(path),
        loaded_at=datetime.now(UTC),
        default=applied[DEFAULT_POLICY],
        by_name=applied,
        by_client=by_client,
        file=policy_file,
        library_files=tuple(libraries),
        warnings=tuple(warnings),
    )


class PolicyStore:
    """Holds the current policies. Readers take `current` without a lock; only reloads serialize."""

    def __init__(self, path: Path | None, *, known_clients: Collection[str] = ()) -> None:
        self.path = path
        self.known_clients = frozenset(known_clients)
        self.refused: RefusedPolicy | None = None
        self._lock = threading.Lock()
        self._signature: Signature = ()
        if path is None:
            self._current = builtin_policies()
            telemetry.record_policy_in_force(BUILTIN_VERSION, loaded=False)
            return
        before = _stat(path)  # taken before the read: a change during it is seen by the next poll
        self._current = read_policies(path, self.known_clients)  # PolicyError: the caller stops
        self._signature = (before, *map(_stat, self._current.library_files))
        self._loaded(self._current)

    @property
    def current(self) -> Policies:
        return self._current

    def _loaded(self, policies: Policies) -> None:
        telemetry.record_policy_in_force(policies.version, loaded=True)
        for warning in policies.warnings:
            log.warning("policy %s: %s", policies.version, warning)

    def poll(self) -> bool:
        """Reload if the policy file or a library it names changed since the last look; True when a new policy
        was taken."""
        if self.path is None:
            return False
        with self._lock:
            signature = (_stat(self.path), *map(_stat, self._current.library_files))
            if signature == self._signature:
                return False
            self._signature = signature  # a refused version is not retried until a file changes again
            try:
                policies = read_policies(self.path, self.known_clients)
            except PolicyError as exc:
                log.error("refused policy file: %s (still deciding with version %s)", exc, self._current.version)
                telemetry.record_policy_refused()
                # Last: whoever sees the refusal also sees its log line and metric.
                self.refused = RefusedPolicy(str(self.path), str(exc), datetime.now(UTC))
                return False
            previous = self._current.version
            # Libraries the new file names are watched from now on.
            self._signature = (signature[0], *map(_stat, policies.library_files))
            self.refused = None
            self._loaded(policies)
            log.info("policy %s loaded from %s (was %s)", policies.version, self.path, previous)
            self._current = policies  # last: whoever sees the new version also sees its metrics and no refusal
            return True

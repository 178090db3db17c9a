"""Staged roll-out of a published version: shadow, then canary steps, then `current` (or abandoned).

The state lives beside the `current` pointer in the registry root, so every replica reading the registry agrees
on it::

    <root>/rollout.json     the roll-out in progress (absent: none): candidate, stage, canary share, routing
    <root>/rollout.jsonl    one JSON object per roll-out event (shadow, canary, raise, complete, abort)

Like the pointer, rollout.json is written to a temporary file, fsynced and renamed into place under the
registry's lock, so a reader sees the old state or the new one, never half of one. The candidate is an ordinary
immutable published version; only completing the roll-out moves `current` (through ModelRegistry.promote).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pydantic
from guardloop.models.registry import ModelRegistry, RegistryError
from pydantic import Field

STATE_FILE = "rollout.json"
EVENTS_FILE = "rollout.jsonl"
STATE_TMP_PREFIX = ".rollout.tmp-"

Stage = Literal["shadow", "canary"]
Routing = Literal["client", "request"]
Event = Literal["shadow", "canary", "raise", "complete", "abort"]


class RolloutState(pydantic.BaseModel):
    """The roll-out in progress. In `shadow` the candidate only scores copies of live traffic; in `canary` it
    answers `share` of it (per client id, stable, or per request)."""

    model_config = pydantic.ConfigDict(frozen=True)

    candidate: str
    baseline: str | None  # the version that was current when the roll-out started
    stage: Stage
    share: float = Field(0.0, ge=0.0, le=1.0)
    by: Routing = "client"
    since: datetime

    @property
    def key(self) -> str:
        """Names this stage and step: tallies and halts are kept per key, so each canary step is judged alone."""
        return "shadow" if self.stage == "shadow" else f"canary@{self.share:g}"


class RolloutEvent(pydantic.BaseModel):
    event: Event
    candidate: str
    stage: Stage | None
    share: float | None = None
    reason: str = ""
    at: datetime


def routed_to_canary(state: RolloutState | None, client: str) -> bool:
    """Whether a request of `client` is answered by the canary. Per client the answer is stable for the whole
    roll-out (hash of candidate and client, so raising the share only adds clients); per request it is random."""
    if state is None or state.stage != "canary" or state.share <= 0.0:
        return False
    if state.share >= 1.0:
        return True
    if state.by == "request":
        return secrets.randbelow(1 << 30) < state.share * (1 << 30)
    digest = hashlib.blake2b(f"{state.candidate}\0{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < state.share * (1 << 64)


class Rollouts:
    """Reads and changes the roll-out state of one registry. Writers hold the registry's lock."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._state_path = registry.root / STATE_FILE
        self._events_path = registry.root / EVENTS_FILE

    def state(self) -> RolloutState | None:
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"cannot read {self._state_path}: {exc.strerror}") from exc
        try:
            return RolloutState.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            raise RegistryError(
                f"{self._state_path} is not a roll-out state ({exc.errors()[0]['msg']}); "
                "run `guardloop models canary --abort` to clear it"
            ) from exc

    def events(self) -> list[RolloutEvent]:
        try:
            lines = self._events_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            try:
                events.append(RolloutEvent.model_validate_json(line))
            except pydantic.ValidationError:
                continue  # only a writer that died mid-append leaves a partial line
        return events

    # ----------------------------------------------------------------- changes
    def start_shadow(self, version: str, *, reason: str = "") -> RolloutState:
        with self.registry.writing():
            self._check_candidate(version)
            state = RolloutState(
                candidate=version, baseline=self.registry.current(), stage="shadow", since=datetime.now(UTC)
            )
            self._write(state, "shadow", reason)
            return state

    def start_canary(self, version: str, share: float, *, by: Routing = "client", reason: str = "") -> RolloutState:
        """Route `share` of traffic to `version` (from shadow, from a lower step, or straight from published)."""
        if not 0.0 < share <= 1.0:
            raise RegistryError(f"canary share {share} must lie in (0, 1]; e.g. 0.05 for 5% of traffic")
        with self.registry.writing():
            self._check_candidate(version)
            present = self.state()
            raising = present is not None and present.candidate == version and present.stage == "canary"
            event: Event = "raise" if raising else "canary"
            state = RolloutState(
                candidate=version,
                baseline=present.baseline if present and present.candidate == version else self.registry.current(),
                stage="canary",
                share=share,
                by=by,
                since=datetime.now(UTC),
            )
            self._write(state, event, reason)
            return state

    def complete(self, *, reason: str = "") -> str:
        """Make the candidate current (history: promote) and end the roll-out; return the version."""
        with self.registry.writing():
            state = self._require_state()
            self.registry.promote(state.candidate)
            self._clear(state, "complete", reason)
            return state.candidate

    def abort(self, *, reason: str) -> str:
        """End the roll-out without touching `current`: every replica drops the candidate at its next poll."""
        with self.registry.writing():
            state = self._require_state()
            self._clear(state, "abort", reason)
            return state.candidate

    # ----------------------------------------------------------------- helpers (caller holds the lock)
    def _check_candidate(self, version: str) -> None:
        self.registry.path(version)  # published, or a RegistryError naming what to do
        if version == self.registry.current():
            raise RegistryError(f"{version} is already current; roll out a newer version")
        present = self.state()
        if present is not None and present.candidate != version:
            raise RegistryError(f"{present.candidate} is being rolled out ({present.key}); complete or abort it first")

    def _require_state(self) -> RolloutState:
        state = self.state()
        if state is None:
            raise RegistryError("no roll-out in progress; start one with `guardloop models canary VERSION`")
        return state

    def _write(self, state: RolloutState, event: Event, reason: str) -> None:
        _replace_atomically(self._state_path, state.model_dump_json().encode() + b"\n")
        self._record(event, state, reason)

    def _clear(self, state: RolloutState, event: Event, reason: str) -> None:
        self._state_path.unlink(missing_ok=True)
        _fsync_directory(self.registry.root)
        self._record(event, state, reason)

    def _record(self, event: Event, state: RolloutState, reason: str) -> None:
        entry = RolloutEvent(
            event=event,
            candidate=state.candidate,
            stage=state.stage,
            share=state.share if state.stage == "canary" else None,
            reason=reason,
            at=datetime.now(UTC),
        )
        with open(self._events_path, "ab") as handle:
            handle.write(entry.model_dump_json().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())


def _replace_atomically(path: Path, content: bytes) -> None:
    tmp = path.parent / f"{STATE_TMP_PREFIX}{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The one swap point: the model the service is answering with right now.

A swap loads and warms the new version first, then replaces one reference. Requests that already took
the old classifier keep it until they finish, so nothing in flight sees a half-loaded model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from guardloop.models.onnx_model import ModelLoadError, OnnxClassifier
from guardloop.models.registry import ModelCard, ModelRegistry, RegistryError, open_classifier
from guardloop.models.rollout import Rollouts, RolloutState
from guardloop.service.memory import return_freed_memory

from guardloop.core import telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    classifier: OnnxClassifier
    card: ModelCard
    loaded_at: datetime
    load_seconds: float

    @property
    def version(self) -> str:
        return self.card.version


@dataclass
class SwapResult:
    version: str
    swapped: bool
    reason: str = ""


@dataclass
class ModelHolder:
    registry: ModelRegistry
    threads: int = 1
    max_seq_len: int = 128
    # Operators' per-category thresholds (settings); they win over the model card's.
    threshold_overrides: dict[str, float] = field(default_factory=dict)
    _current: LoadedModel | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _replaced_since_trim: bool = False  # a model was dropped since the last return_freed_memory()
    # Versions that failed to load, with why; not retried by the poller (a reload forces a retry).
    refused: dict[str, str] = field(default_factory=dict)
    # The roll-out in progress (models/rollout.py) and its candidate, loaded beside the served model.
    rollout: RolloutState | None = None
    _candidate: LoadedModel | None = None
    # Candidates a replica found out of bounds (service/rollout_monitor.py): dropped, never loaded again.
    halted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        telemetry.record_no_model()  # a new holder serves nothing until its first load
        self._rollouts = Rollouts(self.registry)

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def shadow(self) -> LoadedModel | None:
        """The candidate while it only scores copies of live traffic."""
        rollout, candidate = self.rollout, self._candidate
        return candidate if rollout and rollout.stage == "shadow" and candidate else None

    @property
    def canary(self) -> LoadedModel | None:
        """The candidate while it answers a share of live traffic (rollout.share, routed by rollout.by)."""
        rollout, candidate = self.rollout, self._candidate
        return candidate if rollout and rollout.stage == "canary" and candidate else None

    def halt(self, version: str) -> None:
        """Stop using candidate `version` at once (a canary out of bounds); the next poll will not reload it."""
        with self._lock:
            self.halted.add(version)
            if self._candidate is not None and self._candidate.version == version:
                self._candidate, self.rollout = None, None

    def load(self, version: str) -> SwapResult:
        """Load, warm and swap to `version`; on any failure keep serving the old model."""
        with self._lock:  # one load at a time; readers never take this lock
            if self._current is not None and self._current.version == version:
                return SwapResult(version, swapped=False, reason="already serving this version")
            started = time.perf_counter()
            try:
                card, classifier = self._build(version)
            except (ModelLoadError, RegistryError, OSError, ValueError) as exc:
                reason = str(exc)
                self.refused[version] = reason
                telemetry.MODEL_SWAPS_REFUSED.inc()
                log.error("refused model version %s: %s (still serving %s)", version, reason, self.version)
                return SwapResult(version, swapped=False, reason=reason)
            previous = self.version
            self._current = LoadedModel(classifier, card, datetime.now(UTC), time.perf_counter() - started)
            self.refused.pop(version, None)
            self._replaced_since_trim = previous is not None
            telemetry.record_model_served(version, self._current.load_seconds, replaced=previous is not None)
            log.info("now serving model %s (was %s), loaded in %.2fs", version, previous, self._current.load_seconds)
            return SwapResult(version, swapped=True)

    def _build(self, version: str) -> tuple[ModelCard, OnnxClassifier]:
        card = self.registry.card(version)
        classifier = open_classifier(
            self.registry,
            version,
            threads=self.threads,
            max_seq_len=self.max_seq_len,
            threshold_overrides=self.threshold_overrides,
            tokenizer_from=self._current.classifier if self._current else None,
        )
        if list(card.labels) != classifier.model_labels:
            raise ModelLoadError(f"card labels {card.labels} do not match the model's labels")
        classifier.warm_up()
        return card, classifier

    def follow_registry(self, *, force: bool = False) -> SwapResult | None:
        """Swap to the registry's `current` version if it changed; None when there is nothing to do."""
        if self._replaced_since_trim:  # requests on the model replaced a poll ago are long done: it is freed
            self._replaced_since_trim = False
            return_freed_memory()
        self.follow_rollout()
        try:
            target = self.registry.current()
        except (RegistryError, OSError) as exc:
            log.warning("cannot read the registry's current pointer: %s", exc)
            return None
        if target is None or target == self.version:
            return None
        if target in self.refused and not force:
            return None
        return self.load(target)

    @property
    def version(self) -> str | None:
        return self._current.version if self._current else None

    def follow_rollout(self) -> None:
        """Load the roll-out's candidate beside the served model, or drop it when the roll-out ended or was halted."""
        try:
            state = self._rollouts.state()
        except (RegistryError, OSError) as exc:
            log.warning("cannot read the roll-out state: %s (keeping %s)", exc, self.rollout)
            return
        with self._lock:
            if state is None or state.candidate in self.halted or state.candidate == self.version:
                self._candidate, self.rollout = None, None
                return
            if self._candidate is None or self._candidate.version != state.candidate:
                if state.candidate in self.refused:
                    return
                started = time.perf_counter()
                try:
                    card, classifier = self._build(state.candidate)
                except (ModelLoadError, RegistryError, OSError, ValueError) as exc:
                    self.refused[state.candidate] = str(exc)
                    log.error("refused roll-out candidate %s: %s", state.candidate, exc)
                    self._candidate, self.rollout = None, None
                    return
                self._candidate = LoadedModel(classifier, card, datetime.now(UTC), time.perf_counter() - started)
                log.info("loaded roll-out candidate %s (%s)", state.candidate, state.key)
            self.rollout = state

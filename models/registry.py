"""The on-disk model registry: immutable version directories, an atomic `current` pointer and a history.

Layout of a registry root::

    <root>/<version>/        model.onnx, tokenizer.json, labels.json, card.json (+ anything else staged)
    <root>/current           one line: the name of the version the service should load
    <root>/history.jsonl     one JSON object per pointer switch (publish / promote / rollback)
    <root>/.lock             inter-process lock taken by every writer
    <root>/.tmp-<version>-*  staging copies of a publish in progress (or of a crashed one)

A version directory appears under its final name only through one `os.rename`, so readers see either
no version or a complete, fsynced one. The pointer is switched with `os.replace` for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pydantic
from filelock import FileLock, Timeout
from guardloop.models.onnx_model import OnnxClassifier
from pydantic import Field, field_validator, model_validator

from guardloop.core.labels import LABELS

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REQUIRED_FILES: tuple[str, ...] = ("model.onnx", "tokenizer.json", "labels.json")
CARD_FILE = "card.json"
POINTER_FILE = "current"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".tmp-"
POINTER_TMP_PREFIX = ".current.tmp-"
# Names that match VERSION_RE but are taken by the registry's own files.
RESERVED_NAMES: frozenset[str] = frozenset({POINTER_FILE, HISTORY_FILE})

Action = Literal["publish", "promote", "rollback"]


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says what to fix."""


class ModelCard(pydantic.BaseModel):
    """What card.json of a version holds."""

    version: str
    created_at: datetime
    parent: str | None = None
    base_model: str = "all-MiniLM-L6-v2"
    labels: list[str]
    thresholds: dict[str, float]
    metrics: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, str] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    quantization: str | None = None

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        problem = _version_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("created_at")
    @classmethod
    def _aware_created_at(cls, value: datetime) -> datetime:
        # versions() sorts by created_at; naive and aware datetimes cannot be compared, so naive means UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    @model_validator(mode="after")
    def _check_thresholds(self) -> ModelCard:
        unknown = sorted(set(self.thresholds) - set(self.labels))
        if unknown:
            raise ValueError(f"thresholds for labels not in card.labels: {', '.join(unknown)}")
        for label, value in self.thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold of {label!r} is {value}; thresholds must lie in 0..1")
        return self


class HistoryEntry(pydantic.BaseModel):
    """One line of history.jsonl."""

    version: str
    previous: str | None
    at: datetime
    action: Action


def _version_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"version name must be a string, got {type(name).__name__}"
    if not VERSION_RE.fullmatch(name) or ".." in name:
        return (
            f"invalid version name {name!r}: use 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..'"
        )
    if name in RESERVED_NAMES:
        return f"invalid version name {name!r}: it is reserved for the registry's own files"
    return None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    """fsync every file and directory under `top`, children before their parents."""
    for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
        for filename in filenames:
            _fsync_path(Path(dirpath) / filename)
        _fsync_path(Path(dirpath))


class ModelRegistry:
    """A registry rooted at a directory. Safe for concurrent readers and for writers in several processes."""

    def __init__(self, root: Path, *, lock_timeout: float = 600.0) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry root {self.root} exists but is not a directory; point it elsewhere")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.root / LOCK_FILE, timeout=lock_timeout)
        self._lock_timeout = lock_timeout

    # ----------------------------------------------------------------- reading

    @staticmethod
    def validate_version(name: str) -> str:
        problem = _version_problem(name)
        if problem:
            raise RegistryError(problem)
        return name

    def new_version_name(self) -> str:
        while True:
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            name = f"v{stamp}-{secrets.token_hex(2)}"
            if not (self.root / name).exists() and not any(self.root.glob(f"{STAGING_PREFIX}{name}-*")):
                return name

    def _is_published(self, name: str) -> bool:
        return _version_problem(name) is None and (self.root / name / CARD_FILE).is_file()

    def versions(self) -> list[str]:
        names = [entry.name for entry in self.root.iterdir() if entry.is_dir() and self._is_published(entry.name)]
        return sorted(names, key=lambda name: (self.card(name).created_at, name))

    def path(self, version: str) -> Path:
        self.validate_version(version)
        if not self._is_published(version):
            raise RegistryError(f"version {version!r} is not published in {self.root}; see versions()")
        return self.root / version

    def card(self, version: str) -> ModelCard:
        card_path = self.path(version) / CARD_FILE
        try:
            card = ModelCard.model_validate_json(card_path.read_bytes())
        except OSError as exc:
            raise RegistryError(f"cannot read {card_path}: {exc.strerror}; republish the version") from exc
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "card"
            raise RegistryError(f"{card_path} is invalid ({where}: {error['msg']}); republish the version") from exc
        if card.version != version:
            raise RegistryError(
                f"{card_path} says version {card.version!r} but lies in directory {version!r}; republish it"
            )
        return card

    def current(self) -> str | None:
        try:
            name = (self.root / POINTER_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name if self._is_published(name) else None

    def history(self) -> list[HistoryEntry]:
        """All pointer switches, oldest first."""
        path = self.root / HISTORY_FILE
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append(HistoryEntry.model_validate_json(line))
            except pydantic.ValidationError as exc:
                # Only a writer that died mid-append damages a line, and only the last one: the next
                # append drops it. Anything earlier is real corruption.
                if number == len(lines):
                    break
                raise RegistryError(f"{path} line {number} is not a history entry; fix or remove it") from exc
        return entries

    # ----------------------------------------------------------------- writing

    def _acquire(self) -> None:
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise RegistryError(
                f"another process has held {self.root / LOCK_FILE} for over {self._lock_timeout:.0f} s; "
                "wait for its publish to finish or stop it"
            ) from exc
        except OSError as exc:  # a read-only volume (as the service pods mount it), a full disk, no permission
            raise RegistryError(
                f"cannot write to the registry {self.root} ({exc.strerror or exc}); publish, promote and rollback "
                "need it mounted read-write with free space"
            ) from exc

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the registry's lock for several changes (models/rollout.py); the writers inside re-enter it."""
        self._acquire()
        try:
            yield
        finally:
            self._lock.release()

    def publish(self, staging_dir: Path, card: ModelCard, *, make_current: bool = True) -> str:
        """Copy `staging_dir` into the registry as version `card.version`; return the version name."""
        version = self.validate_version(card.version)
        staging_dir = Path(staging_dir)
        if not staging_dir.is_dir():
            raise RegistryError(f"staging directory {staging_dir} does not exist; export the model there first")
        self._acquire()
        try:
            final = self.root / version
            if final.exists():
                raise RegistryError(f"version {version!r} already exists in {self.root}; pick a new name")
            tmp = self.root / f"{STAGING_PREFIX}{version}-{secrets.token_hex(4)}"
            try:
                try:
                    shutil.copytree(staging_dir, tmp)
                    (tmp / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
                    # Checked on the copy, not on staging_dir, so what is checked is what gets published.
                    self._check_artifacts(tmp, card)
                    _fsync_tree(tmp)
                except OSError as exc:  # shutil.Error (a list of failed files) is an OSError too
                    reason = exc.strerror or str(exc).splitlines()[0][:300]
                    raise RegistryError(
                        f"cannot write version {version!r} into {self.root} ({reason}); nothing was published"
                    ) from exc
                try:
                    os.rename(tmp, final)
                except OSError as exc:
                    raise RegistryError(f"cannot move {tmp.name} to {final}: {exc.strerror}") from exc
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            _fsync_path(self.root)
            if make_current:
                self._switch(version, "publish")
            return version
        finally:
            self._lock.release()

    @staticmethod
    def _check_artifacts(directory: Path, card: ModelCard) -> None:
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise RegistryError(f"staging directory lacks {', '.join(missing)}; export all of {REQUIRED_FILES}")
        try:
            labels = json.loads((directory / "labels.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"labels.json is not valid JSON ({exc}); write a JSON list of labels") from exc
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise RegistryError("labels.json must be a JSON list of label strings in output order")
        if labels != card.labels:
            raise RegistryError(f"labels.json {labels} differs from card.labels {card.labels}; make them equal")
        if sorted(labels) != sorted(LABELS):
            raise RegistryError(f"labels {labels} are not a permutation of {list(LABELS)}; retrain or fix labels")

    def _current_stack(self) -> list[str]:
        """Replay the history: publish and promote push the version they made current, rollback pops."""
        stack: list[str] = []
        for entry in self.history():
            if entry.action == "rollback":
                if stack:
                    stack.pop()
            elif not stack or stack[-1] != entry.version:
                stack.append(entry.version)
        return stack

    def promote(self, version: str) -> None:
        """Make an already published version current. Promoting the current version changes nothing."""
        self.validate_version(version)
        self._acquire()
        try:
            self.path(version)
            stack = self._current_stack()
            # Still recorded when the pointer was set by hand, so that history and pointer agree again.
            if self.current() != version or not stack or stack[-1] != version:
                self._switch(version, "promote")
        finally:
            self._lock.release()

    def rollback(self) -> str:
        """Switch back to the version that was current before the present one; return its name.

        The history is read as a stack: publish and promote push the version they made current, a
        rollback pops. So publishing a, b, c then rolling back twice gives b then a, and a third
        rollback fails; a rollback can itself be undone only by promoting.
        """
        self._acquire()
        try:
            stack = self._current_stack()
            present = self.current()
            if not stack:
                raise RegistryError("history.jsonl records no version switch; there is nothing to roll back")
            if stack[-1] != present:
                raise RegistryError(
                    f"history.jsonl does not end at the current version {present!r}; promote a version "
                    "explicitly to resynchronise"
                )
            if len(stack) < 2:
                raise RegistryError(f"no earlier version to roll back to from {present!r}")
            target = stack[-2]
            if not self._is_published(target):
                raise RegistryError(f"previous version {target!r} is no longer on disk; promote one explicitly")
            self._switch(target, "rollback")
            return target
        finally:
            self._lock.release()

    def _switch(self, version: str, action: Action) -> None:
        """Point `current` at `version` and record it. Caller holds the lock."""
        previous = self.current()
        tmp = self.root / f"{POINTER_TMP_PREFIX}{secrets.token_hex(4)}"
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.root / POINTER_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_path(self.root)
        entry = HistoryEntry(version=version, previous=previous, at=datetime.now(UTC), action=action)
        history = self.root / HISTORY_FILE
        with open(history, "a+b") as handle:
            handle.seek(0)
            content = handle.read()
            if content and not content.endswith(b"\n"):
                # A writer died mid-append (we hold the lock, so it is dead): drop its partial line.
                handle.truncate(content.rfind(b"\n") + 1)
            handle.write(entry.model_dump_json().encode("utf-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_path(self.root)

    def remove_stale_staging(self) -> list[Path]:
        """Delete staging leftovers of crashed publishes and pointer switches; return what was deleted.

        Meant for the start-up of the (single) trainer. It takes the registry lock, and every writer
        holds that lock for its whole operation, so anything found here belongs to a dead process.
        """
        removed: list[Path] = []
        self._acquire()
        try:
            for entry in sorted(self.root.iterdir()):
                if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                    removed.append(entry)
                elif entry.name.startswith(POINTER_TMP_PREFIX) and not entry.is_dir():
                    entry.unlink()
                    removed.append(entry)
            if removed:
                _fsync_path(self.root)
        finally:
            self._lock.release()
        return removed


def open_classifier(
    registry: ModelRegistry,
    version: str,
    *,
    threads: int = 2,
    max_seq_len: int = 128,
    threshold_overrides: dict[str, float] | None = None,
    tokenizer_from: OnnxClassifier | None = None,
) -> OnnxClassifier:
    """The one way to open a published version as a classifier: its ONNX model with its card's thresholds
    (`threshold_overrides`, e.g. GUARDLOOP_THRESHOLDS, win). The service, the cycle, eval, calibrate and the
    variations' consistency filter all score through this, so they score a version the same way."""
    card = registry.card(version)
    return OnnxClassifier(
        registry.path(version),
        version=version,
        thresholds=card.thresholds | (threshold_overrides or {}),
        threads=threads,
        max_seq_len=max_seq_len,
        tokenizer_from=tokenizer_from,
    )

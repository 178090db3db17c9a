"""The guideline library the service answers with, reloaded when the operator's file changes.

The file is polled (stat only) rather than watched with inotify: polling also works on network volumes and
on Kubernetes ConfigMaps, whose files are replaced through a symlink swap. A changed file is parsed and
validated before one reference is replaced; a file that does not validate is refused, its reason logged
and kept for GET /guidelines, and the previous library keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from guardloop.core.guidance import DEFAULT_LIBRARY_PATH, GuidelineError, GuidelineLibrary, load_library

log = logging.getLogger(__name__)

# What identifies one version of the file on disk: (inode, size, mtime in ns). The inode catches an
# atomic replace (editors, ConfigMaps) that keeps the size and lands within the same mtime tick.
FileSignature = tuple[int, int, int]


@dataclass(frozen=True)
class LoadedLibrary:
    library: GuidelineLibrary
    source: str  # the file it came from
    loaded_at: datetime


@dataclass(frozen=True)
class RefusedLibrary:
    source: str
    reason: str
    at: datetime


def _signature(path: Path) -> FileSignature | None:
    try:
        stat = os.stat(path)  # follows symlinks: a ConfigMap swap changes the target's inode
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class GuidelineStore:
    """Holds the current library. Readers take `current` without a lock; only reloads serialize."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.refused: RefusedLibrary | None = None
        self._signature: FileSignature | None = None
        self._lock = threading.Lock()
        self._current = self._initial()

    @property
    def current(self) -> LoadedLibrary:
        return self._current

    def _initial(self) -> LoadedLibrary:
        builtin = LoadedLibrary(load_library(DEFAULT_LIBRARY_PATH), "builtin", datetime.now(UTC))
        if self.path is None:
            return builtin
        self._signature = _signature(self.path)
        try:
            return LoadedLibrary(load_library(self.path), str(self.path), datetime.now(UTC))
        except GuidelineError as exc:
            # Start anyway, on the team's defaults: a typo in the guidance file must not take the guard down.
            self._refuse(str(exc), keeping="the built-in library")
            return builtin

    def _refuse(self, reason: str, *, keeping: str) -> None:
        self.refused = RefusedLibrary(str(self.path), reason, datetime.now(UTC))
        log.error("refused guideline library: %s (still using %s)", reason, keeping)

    def poll(self) -> bool:
        """Reload the operator's file if it changed since the last look; True when a new library was taken."""
        if self.path is None:
            return False
        with self._lock:
            signature = _signature(self.path)
            if signature == self._signature:
                return False
            self._signature = signature  # a refused version is not retried until the file changes again
            keeping = f"version {self._current.library.version} from {self._current.source}"
            if signature is None:
                self._refuse(f"{self.path}: file is missing", keeping=keeping)
                return False
            try:
                library = load_library(self.path)
            except GuidelineError as exc:
                self._refuse(str(exc), keeping=keeping)
                return False
            previous = self._current.library.version
            self._current = LoadedLibrary(library, str(self.path), datetime.now(UTC))
            self.refused = None
            log.info("guideline library %s loaded from %s (was %s)", library.version, self.path, previous)
            return True


async def poll_forever(poll: Callable[[], object], interval: float, what: str) -> None:
    """Call `poll` (a store's check of its operator file: guidelines, tenant policies) off the event loop every
    `interval` seconds for as long as the service runs."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(poll)
        except Exception:  # keep watching whatever one poll did
            log.exception("%s poll failed", what)

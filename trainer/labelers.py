"""Labelers that answer a cycle's label requests without people: the oracle reads them from a labeled file.

The cycle (`--oracle FILE`, GUARDLOOP_CYCLE_ORACLE_FILE) and the simulation (the pool file's own labels) both
label through an `OracleLabeler`, so a simulated label arrives exactly as an oracle-answered cycle's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from guardloop.core.datafiles import Example, load_examples
from guardloop.storage import StoredItem
from guardloop.storage.texts import text_hash

ORACLE_REVIEWER = "oracle"
# With an oracle for reviewers, a label the label check doubted gets its second look from the oracle too, under
# this name (a reviewer never answers an item twice), as in simulate; people give it from the queue otherwise.
ORACLE_SECOND_LOOK = "oracle-second-look"


class OracleLabeler:
    """Answers label requests from labeled examples, matched by the normalized text's hash."""

    def __init__(self, path: Path | None = None, *, examples: Sequence[Example] = ()) -> None:
        known = [*(load_examples([path]).examples if path else []), *examples]
        self.labels = {text_hash(ex.text): ex.label for ex in known if ex.label}

    def answer(self, items: Sequence[StoredItem]) -> dict[int, str]:
        """{item id: label} for the pool items it knows (matched by the hash the pool stored)."""
        return {
            item.id: label
            for item, label in zip(items, self.labels_of([i.text_hash for i in items]), strict=True)
            if label
        }

    def labels_of(self, hashes: Sequence[str]) -> list[str | None]:
        """The label of each text hash (storage.texts.text_hash), None where the oracle has none."""
        return [self.labels.get(h) for h in hashes]

"""A serving process takes what start-up built out of the garbage collector's scans (service/memory.py)."""

from __future__ import annotations

import gc

from guardloop.service.memory import YOUNG_OBJECTS_PER_COLLECTION, settle_garbage_collector


def test_settling_freezes_what_exists_and_collects_young_objects_less_often():
    before = gc.get_threshold()
    gc.unfreeze()
    survivors = [[i] for i in range(1000)]  # alive when the service settles: they live as long as the process
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() >= len(survivors)
        assert gc.get_threshold() == (YOUNG_OBJECTS_PER_COLLECTION, *before[1:])
        frozen = gc.get_freeze_count()
        assert gc.collect() >= 0 and gc.get_freeze_count() == frozen  # a full collection leaves them frozen
    finally:
        gc.unfreeze()  # this test process goes on creating and dropping apps
        gc.set_threshold(*before)

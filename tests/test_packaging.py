"""One distribution, one import root: `pip install .` puts exactly `guardloop` into site-packages, with the
data files the package reads at run time (seed data, guidelines, migrations, templates and static files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# setuptools' package-dir: import name prefix -> folder in the repository
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
NOT_SOURCE = (".*", "build", "*.egg-info", "var", "__pycache__", "*.data", "*.onnx")


def package_folders() -> dict[str, Path]:
    """Every folder with an __init__.py under the mapped folders, by the import name it installs as."""
    found: dict[str, Path] = {}
    for prefix, folder in PACKAGE_DIR.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
                continue
            found[".".join([prefix, *relative.parts])] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = package_folders()
    missing = sorted(set(folders) - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - set(folders))
    assert not stale, f"listed in pyproject.toml but no folder with an __init__.py: {stale}"


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package_with_its_data(tmp_path: Path) -> None:
    # Built from a copy: setuptools' build/ folder in the checkout may hold files of modules since removed.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("guardloop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"guardloop"}
    for package in package_folders():  # every package, mapped or not, installs under guardloop/
        assert f"{package.replace('.', '/')}/__init__.py" in names
    for data in (
        "guardloop/core/seed/train.jsonl",
        "guardloop/core/seed/eval.jsonl",
        "guardloop/core/seed/emergency_preparedness.jsonl",
        "guardloop/storage/migrations/env.py",
        "guardloop/service/templates/review.html",
    ):
        assert data in names, data
    assert any(n.startswith("guardloop/core/guidelines/") and n.endswith(".yaml") for n in names)
    assert any(n.startswith("guardloop/storage/migrations/versions/") and n.endswith(".py") for n in names)
    assert any(n.startswith("guardloop/service/static/") for n in names)

    # Installed into a fresh virtual environment, the wheel adds exactly one importable top-level name.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    before = set(_top_level_names(site))
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    assert sorted(set(_top_level_names(site)) - before) == ["guardloop"]
    # ... and the console script, the one CLI.
    assert (venv / "bin" / "guardloop").exists()


def _top_level_names(site: Path) -> list[str]:
    """What `import NAME` could find in `site`: packages and modules, not metadata or path hooks."""
    return [
        p.name.removesuffix(".py")
        for p in site.iterdir()
        if not p.name.endswith((".dist-info", ".pth", ".egg-info")) and p.name != "__pycache__"
    ]

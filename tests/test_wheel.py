"""What a pip user gets: the wheel holds the training script and the recipe files, and both work
from the installed package alone (no repository checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tike_trl.recipes import recipe_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (offline, no build isolation), unpacked into a
    folder that stands for site-packages."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO / "tike_trl", source / "tike_trl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(root / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (root / "dist").glob("tike_trl-*.whl")
    site = root / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_wheel_holds_the_script_and_the_recipes(installed):
    assert (installed / "tike_trl" / "scripts" / "grpo.py").is_file()
    shipped = {p.relative_to(installed).as_posix() for p in (installed / "tike_trl" / "recipes").rglob("*.yaml")}
    assert shipped == {f"tike_trl/recipes/{p.parent.name}/{p.name}" for p in recipe_files().values()}
    assert len(shipped) == 7
    entry_points = next(installed.glob("tike_trl-*.dist-info")) / "entry_points.txt"
    assert "tike-trl = tike_trl.cli:main" in entry_points.read_text()


def _from_the_wheel(installed: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, *args], cwd=installed.parent, env=env, capture_output=True, text=True, timeout=300
    )


def test_packaged_script_help_and_recipe_paths(installed):
    """`python -m tike_trl.scripts.grpo --help` lists the estimator flags; `tike-trl recipes` points
    into the installed package."""
    result = _from_the_wheel(installed, "-m", "tike_trl.scripts.grpo", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--kl_estimator", "--tike_top_k", "--beta", "--model_name_or_path", "--datasets", "--model"):
        assert flag in result.stdout
    result = _from_the_wheel(installed, "-m", "tike_trl.cli", "recipes", "zero3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()) == installed / "tike_trl" / "recipes" / "accelerate" / "zero3.yaml"

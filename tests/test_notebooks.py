"""The notebooks run top to bottom (nbclient), at a small size set through their environment
variables, and leave what they promise: plots and their output folder."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def images(notebook) -> list[dict]:
    """The PNG outputs of a run notebook."""
    return [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def check_quickstart(notebook, tmp_path: Path) -> None:
    assert images(notebook)  # the reward/KL plot
    assert (tmp_path / "outputs" / "quickstart").is_dir()


def check_estimators(notebook, tmp_path: Path) -> None:
    assert len(images(notebook)) == 3  # coverage, bias and variance, token profile
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["setup"]["vocab_size"] == 49152 and results["setup"]["sequences"] == 4
    assert "built-in shifted policy" in results["setup"]["policy_name"]


# notebook -> (its environment at a small size, seconds per cell, the checks after the run)
CASES = {
    "01_quickstart.ipynb": (lambda tmp_path: {"TIKE_QUICKSTART_STEPS": "2"}, 900, check_quickstart),
    "02_estimators.ipynb": (
        lambda tmp_path: {
            "TIKE_NB_PROMPTS": "1",
            "TIKE_NB_POOL": "4",
            "TIKE_NB_COMPLETION_LEN": "6",
            "TIKE_NB_BOOTSTRAP": "50",
            "TIKE_NB_OUTPUT_DIR": str(tmp_path / "out"),
        },
        600,
        check_estimators,
    ),
}


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs(name, tmp_path, monkeypatch):
    environment, timeout, check = CASES[name]
    for variable, value in {**environment(tmp_path), "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(variable, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    check(notebook, tmp_path)

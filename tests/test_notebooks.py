"""The notebooks, two ways: stored with their outputs (what shows where the repository is browsed, written by
`make notebooks`), and run top to bottom here at a small size through their parameters cell (papermill-style,
notebooks/execute.py), leaving what they promise: plots, the trained adapter, the analysis' files."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from notebooks.execute import INJECTED_TAG, NOTEBOOKS, PARAMETERS_TAG, SKIP_TAG, execute, tags


def images(notebook) -> list[dict]:
    """The PNG outputs of a run notebook."""
    return [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def check_quickstart(notebook, tmp_path: Path) -> None:
    assert len(images(notebook)) == 2  # reward/KL/top-k mass, and the side-by-side of two estimators
    summary = json.loads((tmp_path / "outputs" / "quickstart-summary.json").read_text())
    assert set(summary["accuracy"]) == {"before", "after (tike)", "after (k3)"}
    adapter = tmp_path / "outputs" / "quickstart-tike"
    assert (adapter / "adapter_config.json").is_file()
    card = (adapter / "README.md").read_text()
    assert "kl-tike" in card and "@inproceedings{wang-etal-2026-efficient-kl," in card


def check_estimators(notebook, tmp_path: Path) -> None:
    assert len(images(notebook)) == 3  # coverage, bias and variance, token profile
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["setup"]["vocab_size"] == 49152 and results["setup"]["sequences"] == 4
    assert "built-in shifted policy" in results["setup"]["policy_name"]


# notebook -> (its parameters at a small size, seconds per cell, the checks after the run)
CASES = {
    "01_quickstart.ipynb": (
        lambda tmp_path: {"STEPS": 1, "PROMPTS_PER_STEP": 1, "NUM_GENERATIONS": 4, "HELD_OUT": 4},
        600,
        check_quickstart,
    ),
    "02_estimators.ipynb": (
        lambda tmp_path: {
            "PROMPTS": 1,
            "POOL": 4,
            "COMPLETION_LEN": 6,
            "BOOTSTRAP": 50,
            "OUTPUT_DIR": str(tmp_path / "out"),
        },
        600,
        check_estimators,
    ),
}


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_notebook_holds_its_full_run(name):
    """Stored as `make notebooks` leaves them: every cell run in order, at the default parameters (nothing
    injected), without errors, with the plots; the cells tagged skip-execution never run."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert sum(PARAMETERS_TAG in tags(cell) for cell in code) == 1
    assert not [cell for cell in code if INJECTED_TAG in tags(cell)]
    skipped = [cell for cell in code if SKIP_TAG in tags(cell)]
    assert all(cell.execution_count is None and not cell.outputs for cell in skipped)
    counts = [cell.execution_count for cell in code if cell not in skipped]
    assert counts == list(range(1, len(counts) + 1))
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert len(images(notebook)) == {"01_quickstart.ipynb": 2, "02_estimators.ipynb": 3}[name]


def test_the_quickstart_hub_switch_is_optional_and_never_run_here():
    notebook = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", as_version=4)
    (hub,) = [cell for cell in notebook.cells if "Qwen/" in cell.source and cell.cell_type == "code"]
    assert SKIP_TAG in tags(hub) and "USE_HUB_MODEL = False\nif USE_HUB_MODEL:" in hub.source


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_small(name, tmp_path, monkeypatch):
    parameters, timeout, check = CASES[name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the Hub
    notebook = execute(NOTEBOOKS / name, parameters(tmp_path), cwd=tmp_path, timeout=timeout)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    check(notebook, tmp_path)

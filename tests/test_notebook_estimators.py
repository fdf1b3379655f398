"""notebooks/02_estimators.ipynb runs top to bottom on the embedded model, at a small size."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_estimators.ipynb"


@pytest.mark.slow
def test_estimators_notebook_runs(tmp_path, monkeypatch):
    for name, value in {
        "TIKE_NB_PROMPTS": "1",
        "TIKE_NB_POOL": "4",
        "TIKE_NB_COMPLETION_LEN": "6",
        "TIKE_NB_BOOTSTRAP": "50",
        "TIKE_NB_OUTPUT_DIR": str(tmp_path / "out"),
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # coverage, bias and variance, token profile
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["setup"]["vocab_size"] == 49152 and results["setup"]["sequences"] == 4
    assert "built-in shifted policy" in results["setup"]["policy_name"]

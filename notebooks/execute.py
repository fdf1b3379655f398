"""Run the notebooks top to bottom and store them with their outputs, so that their tables and plots show
wherever the repository is browsed: `make notebooks`, or `python notebooks/execute.py [NAME.ipynb ...]`.

Parameters work as in papermill: a notebook's cell tagged `parameters` holds its defaults (the full size, what
is stored), and `execute(path, parameters)` runs it with a cell tagged `injected-parameters` inserted after that
one, overriding them; the test suite runs the notebooks small that way. Cells tagged `skip-execution` (the
optional switch to a Hub model on a GPU) are never run here. The notebooks run with this folder as their working
directory, so what they write lands in notebooks/outputs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
SKIP_TAG = "skip-execution"


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def inject(notebook, parameters: dict) -> None:
    """Insert a cell assigning `parameters` right after the cell tagged `parameters` (papermill's convention)."""
    index = next(i for i, cell in enumerate(notebook.cells) if PARAMETERS_TAG in tags(cell))
    source = "# injected parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    notebook.cells.insert(index + 1, cell)


def execute(path: Path, parameters: dict | None = None, cwd: Path = NOTEBOOKS, timeout: int = 1800):
    """Run the notebook at `path` (with `parameters` injected, if any) in `cwd`; return it with its outputs."""
    notebook = nbformat.read(path, as_version=4)
    notebook.cells = [cell for cell in notebook.cells if INJECTED_TAG not in tags(cell)]
    if parameters:
        inject(notebook, parameters)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
        record_timing=False,  # no timestamps in the stored files
        coalesce_streams=True,  # one stdout and one stderr per cell, progress bars at their last state
        skip_cells_with_tag=SKIP_TAG,
    ).execute()
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: every notebook in this folder)")
    names = parser.parse_args(argv).names or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for name in names:
        path = NOTEBOOKS / name
        start = time.perf_counter()
        notebook = execute(path)
        nbformat.write(notebook, path)
        print(f"{name}: ran in {time.perf_counter() - start:.0f} s, stored with its outputs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's Python snippets run as written, offline; those marked as needing the Hugging Face Hub (first
line `# needs the Hugging Face Hub`) are only compiled and their imports checked, since nothing here may
download."""

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
HUB_MARK = "# needs the Hugging Face Hub"
NEEDS_HUB = [s for s in SNIPPETS if s.splitlines()[0] == HUB_MARK]
RUNNABLE = [s for s in SNIPPETS if "import" in s and "# was:" not in s.splitlines()[0] and s not in NEEDS_HUB]


def test_readme_has_the_examples():
    assert len(RUNNABLE) >= 2
    assert len(NEEDS_HUB) >= 1  # the quick start, first


def test_the_quick_start_comes_first_and_is_marked_as_needing_the_hub():
    text = README.read_text()
    assert text.index("## Quick start") < text.index("## Offline, on a CPU") < text.index("make train")
    assert SNIPPETS[0] in NEEDS_HUB and "Needs the Hugging Face Hub" in text.split("## Offline")[0]


@pytest.mark.parametrize("snippet", NEEDS_HUB, ids=lambda s: s.splitlines()[1][:40])
def test_hub_snippet_compiles_and_its_imports_exist(snippet):
    tree = ast.parse(snippet)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            assert all(hasattr(module, alias.name) for alias in node.names), ast.unparse(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


@pytest.mark.slow
@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: s.splitlines()[0][:40])
def test_readme_snippet_runs(snippet, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

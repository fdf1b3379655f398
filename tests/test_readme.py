"""The README's Python snippets run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [s for s in SNIPPETS if "import" in s and "# was:" not in s.splitlines()[0]]


def test_readme_has_the_examples():
    assert len(RUNNABLE) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: s.splitlines()[0][:40])
def test_readme_snippet_runs(snippet, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the repository root, for `benchmarks`

from tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer, saved locally (GRPOTrainer reloads the reference from the path)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))

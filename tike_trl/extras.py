"""The optional dependencies (the package's extras): a missing one is reported on one line that names the extra
installing it, as TRL does for its own extras."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import InputError

# top-level module -> the extra of tike-trl that installs it
EXTRAS = {"matplotlib": "plot", "peft": "peft", "deepspeed": "deepspeed", "gguf": "embedded"}


class MissingExtraError(InputError, ImportError):
    """An optional package is not installed. An `ImportError` for code that expects one, and an `InputError` for
    the command line, which prints it on one line."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` saying that `purpose` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs {top}, which is not installed: pip install 'tike-trl[{EXTRAS.get(top, top)}]'"
        ) from None

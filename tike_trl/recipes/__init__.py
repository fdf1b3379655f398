"""Print the paths of the recipe files installed with tike-trl (`tike-trl recipes [NAME]`).

`accelerate/` holds accelerate launch configs (ddp, zero2, zero3, fsdp2), which follow TRL's own
`trl/accelerate_configs/` (bf16, 8 processes); `configs/` holds the training configs that
`--config` takes (smollm2_arithmetic is the embedded default; the Qwen2.5 ones are the TIKE
paper's DAPO-Math setup). With a NAME, only that file's path is printed, for use in a shell:

    accelerate launch --config_file "$(tike-trl recipes zero3)" -m tike_trl.scripts.grpo \\
        --config "$(tike-trl recipes qwen2.5-7b_dapo)"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

ROOT = Path(__file__).resolve().parent
KINDS = ("accelerate", "configs")


def recipe_files() -> dict[str, Path]:
    """Every installed recipe file by name (its file name without `.yaml`)."""
    return {path.stem: path for kind in KINDS for path in sorted((ROOT / kind).glob("*.yaml"))}


def recipe_path(name: str) -> Path:
    """The installed file for a recipe name: `zero3`, `zero3.yaml` or `accelerate/zero3.yaml`."""
    files = recipe_files()
    stem = Path(name).name.removesuffix(".yaml")
    if stem not in files:
        raise InputError(f"no recipe {name!r}: there are {', '.join(files)}")
    return files[stem]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="a recipe name (e.g. zero3, qwen2.5-1.5b_dapo); none lists them all")


def run(args: argparse.Namespace) -> int:
    if args.name is not None:
        print(recipe_path(args.name))
        return 0
    for name, path in recipe_files().items():
        print(f"{path.parent.name + '/' + name:<32} {path}")
    return 0

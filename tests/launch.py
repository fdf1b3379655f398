"""Launch a training script on 2 CPU processes through one of `tike_trl/recipes/accelerate/*.yaml`, the way
a GPU user launches it, plus the few overrides a CPU needs; and the same script in-process on one
process, for comparisons.

    result = launch("zero3", ["--model-dir", str(model_dir), "--kl-estimator", "tike"], tmp_path)
    assert result["world_size"] == 2

How to get several processes on a CPU at all: `accelerate launch --num_processes 2 --cpu` silently
runs ONE process. What works is a multi-GPU recipe (`--multi_gpu`, as `ddp.yaml` sets) plus
`use_cpu` (or `ACCELERATE_USE_CPU=true`); without `use_cpu`, `--multi_gpu` on a CPU runs two
independent single-process trainings.

The CPU overrides, each found the hard way:
- `--mixed_precision no`: the recipes say bf16 (right on GPUs; TRL's zero3.yaml sets it too, so
  fp32 needs this flag); on CPU, accelerate would then autocast the forward to bf16 although the
  TIKEConfig says bf16=False, silently (the 1- and 2-process runs then differ by ~1% in KL after
  one step).
- The script passes `use_cpu=True` to TIKEConfig (`train_tiny.py` does, without CUDA); without it a
  DDP recipe silently runs two independent 1-process trainings. Setting `ACCELERATE_USE_CPU=true`
  instead breaks DeepSpeed: ZeRO-3 partitions the models at load time, but the accelerator picks
  MULTI_CPU and never wraps them, so the first forward sees empty weights.
- `DS_ACCELERATOR=cpu` for DeepSpeed on CPU, whose first start compiles a small C++ op once
  (~33 s, then cached).
- `OMP_NUM_THREADS=1`: two processes on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tike_trl.recipes import ROOT

REPO = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "accelerate"
TRAIN_TINY = Path(__file__).resolve().parent / "scripts" / "train_tiny.py"

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CPU_FLAGS = ["--mixed_precision", "no"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate() -> str:
    local = Path(sys.executable).with_name("accelerate")
    return str(local) if local.exists() else shutil.which("accelerate") or "accelerate"


def accelerate_launch(recipe: str, num_processes: int = 2, cpu: bool = True) -> list[str]:
    """`accelerate launch` through `RECIPES/<recipe>.yaml` on `num_processes` processes (with the
    CPU overrides above, unless `cpu=False`; the environment's part is `CPU_ENV`), before the script."""
    return [
        _accelerate(),
        "launch",
        "--config_file",
        str(RECIPES / f"{recipe}.yaml"),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(_free_port()),
        *(CPU_FLAGS if cpu else []),
    ]


def launch(
    recipe: str,
    script_args: list[str],
    out_dir: Path,
    script: Path = TRAIN_TINY,
    num_processes: int = 2,
    cpu: bool = True,
    timeout: int = 900,
) -> dict:
    """Run `script` under `accelerate launch --config_file tike_trl/recipes/accelerate/<recipe>.yaml`
    on `num_processes` processes (CPU ones with the overrides above, unless `cpu=False`) and return
    the JSON it writes to `--out`."""
    out = Path(out_dir) / f"{recipe}-result.json"
    cmd = [*accelerate_launch(recipe, num_processes, cpu), str(script), "--out", str(out), *script_args]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **(CPU_ENV if cpu else {})}, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"{' '.join(cmd)}\nexited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def train_in_process(model_dir: Path, out_dir: Path, **kwargs) -> dict:
    """The same training as `train_tiny.py`, on one process, inside the test process."""
    sys.path.insert(0, str(TRAIN_TINY.parent))
    try:
        from train_tiny import run
    finally:
        sys.path.remove(str(TRAIN_TINY.parent))
    return run(str(model_dir), str(out_dir), use_cpu=True, **kwargs)

"""The GPU check's command: the stages one after the other, each in its own process with its own
timeout, inside one time budget; the report rewritten after every stage.

    python -m benchmarks.gpu_check --run-name h200   # on a CUDA machine (benchmarks/gpu_check.sh: wheels first)
    python -m benchmarks.gpu_check --smoke           # every stage at a tiny size, on the CPU

A stage writes its result file after every piece of work it finishes (a test, a size, a training
run), so a stage stopped by its timeout still reports what it did. Each stage runs in a fresh
process: a timeout can stop it, CUDA memory is returned between stages, and DeepSpeed's
process-wide state (ZeRO-3 on one process, with the distributed environment variables set for
that stage only) cannot leak into the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import report as reporting
from .settings import SETTINGS, Settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = {
    "gpu": ROOT / "benchmarks" / "results" / "gpu-check",
    "smoke": ROOT / "benchmarks" / "results" / "gpu-check-smoke",
}
PACKAGES = ("torch", "triton", "transformers", "trl", "accelerate", "datasets", "peft", "deepspeed", "tike-trl")
# the image's packages whose versions the carried wheels need and nobody has recorded
PACKAGES += ("huggingface-hub", "tokenizers", "numpy", "pyarrow", "pandas", "fsspec", "pydantic", "matplotlib")
MIN_STAGE_S = 10  # a stage is not started with less time than this left in the budget


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    estimate_s: dict[str, int]  # per settings name; "gpu": an estimate for one H200, before any run
    timeout_s: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)


STAGES = (
    Stage(
        "cuda-tests",
        "the CUDA-only tests: pytest -m gpu",
        estimate_s={"gpu": 40, "smoke": 10},
        timeout_s={"gpu": 90, "smoke": 120},
    ),
    Stage(
        "loss-step",
        "benchmarks.loss_step: k3, tike (2 k), rb, at 2 micro-batch sizes",
        estimate_s={"gpu": 100, "smoke": 15},
        timeout_s={"gpu": 150, "smoke": 120},
    ),
    Stage(
        "train",
        "3 training steps each of k3 (TRL), tike, rb: plain and LoRA",
        estimate_s={"gpu": 65, "smoke": 25},
        timeout_s={"gpu": 110, "smoke": 120},
    ),
    Stage(
        "train-zero3",
        "3 training steps each of k3 (TRL), tike, rb: DeepSpeed ZeRO-3 on one process",
        estimate_s={"gpu": 70, "smoke": 15},
        timeout_s={"gpu": 120, "smoke": 120},
        # one process, no launcher: DeepSpeed reads these instead of asking MPI
        env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"},
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# no network on the GPU machine: nothing may wait on the Hub
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---- one stage, in its own process ----


def run_stage(name: str, settings: Settings, workdir: Path, stage_file: Path) -> None:
    def emit(result: dict) -> None:
        reporting.write_json(stage_file, result)

    if name == "cuda-tests":
        from . import cuda_tests

        cuda_tests.run(emit)
    elif name == "loss-step":
        from . import loss_steps

        loss_steps.run(settings, workdir, emit)
    elif name in ("train", "train-zero3"):
        notes = []
        if name == "train-zero3":
            try:
                # the module itself: the attribute deepspeed.comm.torch is the torch package
                ds_torch_backend = importlib.import_module("deepspeed.comm.torch")
            except ImportError as exc:
                emit({"skipped": f"DeepSpeed is not installed ({exc}): ZeRO-3 not run", "runs": []})
                return
            if settings.device == "cpu":
                # DeepSpeed's CPU backend compiles a shared-memory all-reduce op at start (~30 s, minutes on a
                # busy machine); one process never uses it. (On CUDA there is no such op to build.)
                ds_torch_backend.build_shm_op = lambda: None
                notes.append("CPU: DeepSpeed's shared-memory comm op not built (one process does not use it)")
        from . import training

        setups = ("zero3",) if name == "train-zero3" else ("plain", "lora")
        training.run(settings, workdir, setups, lambda result: emit({**result, "notes": notes}))
    else:
        raise ValueError(f"unknown stage {name!r}")


# ---- the whole check ----


def environment(settings: Settings) -> dict:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    if packages["tike-trl"] is None:  # not installed: it runs from the working tree
        version = re.search(r'__version__ = "(.+?)"', (ROOT / "tike_trl" / "__init__.py").read_text())
        packages["tike-trl"] = f"{version.group(1) if version else '?'} (working tree)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "device": _device_name(settings),
        "python": platform.python_version(),
        "commit": commit.stdout.strip() if commit.returncode == 0 else None,  # no .git on the device machine
        "packages": packages,
        "install_s": os.environ.get("GPU_CHECK_INSTALL_S"),
    }


def _device_name(settings: Settings) -> str:
    if settings.device == "cuda":
        try:
            query = "--query-gpu=name,memory.total,driver_version"
            out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except OSError:
            pass
        return "CUDA GPU"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (CPU smoke run)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(result: dict | None, returncode: int | None, timed_out: bool) -> tuple[str, str]:
    """(status, note) of a finished stage from its result file and its process's exit."""
    failed = [c["name"] for c in _checks(result) if c["kind"] == "correctness" and not c["ok"]]
    if timed_out:
        return "timeout", "stopped at its timeout; the result holds what it finished"
    if result is not None and result.get("skipped"):
        return "skipped", result["skipped"]
    if returncode != 0:
        return "error", f"exited {returncode}; see its log"
    if result is None:
        return "error", "wrote no result"
    if failed:
        return "failed", "failed: " + "; ".join(failed[:6])
    targets = [c for c in _checks(result) if c["kind"] == "target"]
    notes = [f"targets met: {sum(c['ok'] for c in targets)}/{len(targets)}"] if targets else []
    return "passed", "; ".join(notes + result.get("notes", []))


def _checks(result: dict | None) -> list[dict]:
    """Every check in a stage result, wherever it sits (the stage, its sizes, its runs)."""
    if not result:
        return []
    found = list(result.get("checks", []))
    for key in ("sizes", "runs"):
        for item in result.get(key, []):
            found += item.get("checks", [])
    return found


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (the stage's): the stage and all it started, also
    processes in groups of their own (ninja runs each compile in one), which killpg would miss."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state ppid pgrp session
            if int(fields[3]) == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass  # gone already, or not ours to read
    try:
        os.killpg(sid, signal.SIGKILL)  # where there is no /proc
    except OSError:
        pass


def _run_stage_process(stage: Stage, settings: Settings, workdir: Path, timeout: float, log: Path) -> dict:
    stage_file = workdir / f"stage-{stage.name}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", stage.name, "--settings", settings.name]
    cmd += ["--workdir", str(workdir), "--stage-file", str(stage_file)]
    env = {**os.environ, **OFFLINE_ENV, **stage.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if "MASTER_ADDR" in stage.env:
        env["MASTER_PORT"] = str(_free_port())
    if settings.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    start = time.perf_counter()
    with open(log, "w") as out:
        # a session of its own, so that a timeout stops the stage and every process it started
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill_session(proc.pid)
            returncode, timed_out = proc.wait(), True
    wall = time.perf_counter() - start
    result = json.loads(stage_file.read_text()) if stage_file.exists() else None
    status, note = _status(result, returncode, timed_out)
    return {"status": status, "note": note, "wall_s": wall, "returncode": returncode, "result": result}


def run_check(
    settings: Settings, out_dir: Path, run_name: str, stages: tuple[str, ...], budget_s: float | None = None
) -> dict:
    budget = settings.budget_s if budget_s is None else budget_s
    started = datetime.now(timezone.utc)
    stem = out_dir / f"{started:%Y-%m-%d}-{run_name}"
    t0 = time.perf_counter()
    report = {
        "check": "gpu-check",
        "run": stem.name,
        "started_utc": started.isoformat(timespec="seconds"),
        "budget_s": budget,
        "result": "running",
        "environment": environment(settings),
        "settings": {**asdict(settings), "targets": [asdict(t) for t in settings.targets]},
        "stages": [
            {
                "name": s.name,
                "title": s.title,
                "status": "pending" if s.name in stages else "not selected",
                "estimate_s": s.estimate_s[settings.name],
            }
            for s in STAGES
        ],
    }
    reporting.write(report, stem)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for stage, entry in zip(STAGES, report["stages"]):
            if stage.name not in stages:
                continue
            left = budget - (time.perf_counter() - t0)
            if left < MIN_STAGE_S:
                entry.update(status="skipped", note=f"not started: {left:.0f} s left of the {budget} s budget")
            else:
                timeout = min(stage.timeout_s[settings.name], left)
                log = stem.parent / f"{stem.name}-{stage.name}.log"
                print(f"[gpu-check] {stage.name}: {stage.title} (timeout {timeout:.0f} s)", flush=True)
                entry.update(timeout_s=timeout, log=log.name)
                entry.update(_run_stage_process(stage, settings, Path(tmp), timeout, log))
                reporting.copy_out([log])
                print(f"[gpu-check] {stage.name}: {entry['status']} in {entry['wall_s']:.1f} s {entry['note']}")
            report["wall_s"] = time.perf_counter() - t0
            written = reporting.write(report, stem)
            reporting.copy_out(written)
    bad = [s["name"] for s in report["stages"] if s["status"] in ("failed", "error", "timeout")]
    report["result"] = "passed" if not bad else "problems in " + ", ".join(bad)
    report["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["wall_s"] = time.perf_counter() - t0
    written = reporting.write(report, stem)
    report["files"] = [p.name for p in written]
    reporting.write_json(written[0], report)
    reporting.copy_out(written)
    return report


def _unused(out_dir: Path, run_name: str) -> str:
    """`run_name`, or `run_name-2`, `-3`, ... if today's run of that name exists: a run never
    overwrites another, and a rerun of the same command (on a machine that kept the first run's
    files) does not fail for it."""
    date, name, n = f"{datetime.now(timezone.utc):%Y-%m-%d}", run_name, 1
    while (out_dir / f"{date}-{name}.json").exists():
        n += 1
        name = f"{run_name}-{n}"
    if name != run_name:
        print(f"[gpu-check] a run named {run_name!r} exists in {out_dir}: this one is {name!r}")
    return name


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="The prepared GPU check (docs/benchmarks.md, 'The GPU check').",
    )
    parser.add_argument("--smoke", action="store_true", help="every stage at a tiny size, on the CPU")
    parser.add_argument("--run-name", help="what distinguishes this run (default: the UTC time)")
    parser.add_argument(
        "--out-dir", type=Path, help="default: benchmarks/results/gpu-check (smoke: gpu-check-smoke, git-ignored)"
    )
    parser.add_argument(
        "--stages", default=",".join(STAGE_NAMES), help=f"comma-separated, of {', '.join(STAGE_NAMES)}"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for all stages (default: 285; smoke 240)")
    # one stage, as the check runs it in a process of its own
    parser.add_argument("--stage", choices=STAGE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--settings", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage, SETTINGS[args.settings], args.workdir, args.stage_file)
        return None
    settings = SETTINGS["smoke" if args.smoke else "gpu"]
    out_dir = args.out_dir or DEFAULT_OUT[settings.name]
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGE_NAMES)}")
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.exit(2, "the GPU check needs CUDA and there is none here: `--smoke` runs it on the CPU.\n")
    if args.run_name is not None and (not args.run_name or "/" in args.run_name):
        parser.error(f"--run-name {args.run_name!r}: give a non-empty name without '/'")
    run_name = f"{'smoke-' if args.smoke else ''}{args.run_name or f'{datetime.now(timezone.utc):%H%M%SZ}'}"
    report = run_check(settings, out_dir, _unused(out_dir, run_name), stages, args.budget)
    print(reporting.markdown(report))
    return report

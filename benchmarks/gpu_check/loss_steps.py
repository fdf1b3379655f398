"""The loss-step stage: `benchmarks.loss_step`'s comparison (its `build`, `measure` and tables),
restricted to TRL's k3, tike at the small and large k, rb, and the head-less step it measures the
heads against, at each of `settings.bench_sizes`, on one build of the trainers.

The naive (materialising) variants are left out: the GPU check compares against the targets,
which are ratios to k3; `python -m benchmarks.loss_step --mode gpu` still runs them.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks import loss_step
from benchmarks.measure import freed_memory_kept

from .settings import Settings

KEPT = ("backbone", "trl k3", "tike", "rb tiled", "reference forward")


def _finite_step(row: dict) -> bool:
    """Finite loss and kl, for the variants that compute them (the reference forward alone does not)."""
    if row["variant"] == "reference forward":
        return True
    return math.isfinite(row["loss"]) and math.isfinite(row["kl"])


def mode(settings: Settings, sequences: int, repeats: int, warmup: int) -> loss_step.Mode:
    base = loss_step.MODES["gpu" if settings.device == "cuda" else "smoke"]
    return replace(
        base,
        name=f"gpu-check-{settings.name}",
        geometry=settings.geometry,
        dtype=settings.dtype,
        batch=sequences,
        prompt=settings.prompt,
        completion=settings.completion,
        top_ks=settings.top_ks,
        repeats=repeats,
        warmup=warmup,
        fit_batches=(),
    )


def ratios(rows: list[dict], settings: Settings) -> list[dict]:
    """Each target variant's step time and peak memory over TRL's k3 in the same run, against the
    targets (checks of kind "target": they are what the run measures, not whether it worked)."""
    k3 = next((r for r in rows if r["variant"] == "trl k3" and not r["oom"]), None)
    checks = []
    for target in settings.targets:
        row = next((r for r in rows if (r["variant"], r["k"]) == (target.variant, target.k)), None)
        measured = k3 is not None and row is not None and not row["oom"]
        time_ratio = row["time_s"] / k3["time_s"] if measured else None
        peak_ratio = row["peak_mem_bytes"] / k3["peak_mem_bytes"] if measured else None
        for what, value, limit in (("time", time_ratio, target.time), ("peak", peak_ratio, target.peak)):
            checks.append(
                {
                    "name": f"{target.variant}{'' if target.k is None else f' k={target.k}'} {what} / k3",
                    "kind": "target",
                    "tokens": rows[0]["tokens"] if rows else None,
                    "value": value,
                    "limit": limit,
                    "ok": value is not None and value <= limit,
                }
            )
    return checks


def run(settings: Settings, workdir: Path, emit: Callable[[dict], None]) -> dict:
    """Build the trainers once, then measure at each size; `emit` gets the result after each size."""
    device = torch.device(settings.device)
    first = settings.bench_sizes[0]
    threads = torch.get_num_threads()
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-", dir=workdir) as tmp,
        freed_memory_kept() if device.type == "cpu" else nullcontext(False),
    ):
        if device.type == "cpu":
            torch.set_num_threads(1)  # as the benchmark's CPU modes
        try:
            env = loss_step.environment(device)
            result: dict = {
                "environment": env,
                "geometry": asdict(settings.geometry),
                "dtype": settings.dtype,
                "sizes": [],
            }
            bench = loss_step.build(mode(settings, first.sequences, first.repeats, first.warmup), Path(tmp))
            bench.variants = [v for v in bench.variants if v.name in KEPT]
            result["build_s"] = time.perf_counter() - start
            result["gradient_checkpointing"] = loss_step._is_checkpointing(bench.variants[0].trainer.model)
            emit(result)
            for size in settings.bench_sizes:
                t0 = time.perf_counter()
                bench.mode = mode(settings, size.sequences, size.repeats, size.warmup)
                inputs = loss_step.synthetic_batch(bench.mode, size.sequences, device)
                rows = loss_step.measure(bench, inputs)
                del inputs
                table = _table(bench.mode, rows, env["device"])
                result["sizes"].append(
                    {
                        "sequences": size.sequences,
                        "tokens": bench.mode.tokens,
                        "repeats": size.repeats,
                        "warmup": size.warmup,
                        "rows": rows,
                        "table": table,
                        "wall_s": time.perf_counter() - t0,
                        "checks": [
                            {
                                "name": f"{bench.mode.tokens} tokens: every variant measured, finite loss and kl",
                                "kind": "correctness",
                                "ok": all(not r["oom"] and _finite_step(r) for r in rows),
                                "value": [r["variant"] for r in rows if r["oom"]],
                            },
                            *ratios(rows, settings),
                        ],
                    }
                )
                emit(result)
        finally:
            torch.set_num_threads(threads)
    return result


def _table(mode: loss_step.Mode, rows: list[dict], device: str) -> str:
    """loss_step's own markdown table for these rows."""
    return loss_step.markdown_table(
        {
            "rows": rows,
            "device": device,
            "mode": mode.name,
            "micro_batch": {"tokens": mode.tokens},
            "repeats": mode.repeats,
            "load_average_1min": {"before": os.getloadavg()[0]},
            "fits": [],
        }
    )

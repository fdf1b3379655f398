"""The loss-step benchmark's own machinery (`benchmarks.loss_step`) at a tiny size: it runs, writes
the JSON, table and plot it promises, every variant's numbers are finite, and the naive heads
compute what the tiled ones do. No timing assertions: speed is the benchmark's output, not a test."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.loss_step import (
    MODES,
    Bench,
    largest_fits,
    main,
    markdown_table,
    measure,
    run_files,
    synthetic_batch,
)
from benchmarks.plot import plot_loss_step

SMOKE = MODES["smoke"]
VARIANTS = {
    ("backbone", None),
    ("trl k3", None),
    *(("tike", k) for k in SMOKE.top_ks),
    ("rb tiled", None),
    ("reference forward", None),
    ("tike, kept reference", 16),
    ("rb, kept reference", None),
    ("tike naive", 16),
    ("rb naive", None),
}
ROW_KEYS = {"variant", "k", "tokens", "peak_mem_bytes", "head_extra_mem_bytes", "time_s", "device", "versions"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = main(["--mode", "smoke", "--out-dir", str(out), "--run-name", "test", "--plot", str(out / "plot.png")])
    return out, result


def test_smoke_run_writes_json_table_and_plot(smoke):
    out, result = smoke
    (json_path,) = (out / "smoke").glob("*-test.json")
    saved = json.loads(json_path.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert {(r["variant"], r["k"]) for r in saved["rows"]} == VARIANTS
    assert saved["repeats"] >= 5 and saved["warmup"] >= 1 and saved["gradient_checkpointing"] is True
    for row in saved["rows"]:
        assert ROW_KEYS <= row.keys() and not row["oom"]
        assert row["tokens"] == SMOKE.batch * (SMOKE.prompt + SMOKE.completion)
        assert len(row["times_s"]) == saved["repeats"]
        assert all(t > 0 and math.isfinite(t) for t in row["times_s"])
        assert row["time_s"] == statistics.median(row["times_s"])
        assert 0 < row["start_mem_bytes"] <= row["peak_mem_bytes"]
        assert all(math.isfinite(row[key]) for key in ("cpu_time_s", "head_time_s"))
        if row["variant"] != "reference forward":  # the reference pass alone computes no loss
            assert math.isfinite(row["loss"]) and math.isfinite(row["kl"])
        assert {"torch", "trl", "transformers", "tike_trl"} <= row["versions"].keys()
    table = json_path.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(VARIANTS) + 2  # header, rule, one line per variant
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_naive_and_tiled_heads_measure_the_same_computation(smoke):
    rows = {(r["variant"], r["k"]): r for r in smoke[1]["rows"]}
    assert rows["tike", 16]["kl"] > 0 and rows["rb tiled", None]["kl"] > 0  # the policy was moved off the reference
    for naive, tiled in [(("tike naive", 16), ("tike", 16)), (("rb naive", None), ("rb tiled", None))]:
        assert rows[naive]["kl"] == pytest.approx(rows[tiled]["kl"], rel=1e-4)
        assert rows[naive]["loss"] == pytest.approx(rows[tiled]["loss"], rel=1e-5, abs=1e-7)


def test_kept_reference_states_give_the_same_step(smoke):
    rows = {(r["variant"], r["k"]): r for r in smoke[1]["rows"]}
    for kept, fresh in [
        (("tike, kept reference", 16), ("tike", 16)),
        (("rb, kept reference", None), ("rb tiled", None)),
    ]:
        assert rows[kept]["kl"] == pytest.approx(rows[fresh]["kl"], rel=1e-5)
        assert rows[kept]["loss"] == pytest.approx(rows[fresh]["loss"], rel=1e-5, abs=1e-7)


def test_head_extra_memory_is_measured_against_the_headless_step(smoke):
    rows = smoke[1]["rows"]
    backbone = next(r for r in rows if r["variant"] == "backbone")
    assert backbone["head_extra_mem_bytes"] == 0
    for row in rows:
        assert row["head_extra_mem_bytes"] == row["peak_mem_bytes"] - backbone["peak_mem_bytes"]
        if row is not backbone:
            assert row["head_extra_mem_bytes"] > 0


def test_each_run_gets_new_files_and_none_is_overwritten(tmp_path):
    json_path, _ = run_files(tmp_path, "smoke", "taken")
    json_path.parent.mkdir(parents=True)
    json_path.write_text("an earlier run")
    with pytest.raises(SystemExit, match="already exists"):
        main(["--mode", "smoke", "--out-dir", str(tmp_path), "--run-name", "taken"])
    assert json_path.read_text() == "an earlier run"
    now = datetime(2026, 11, 23, 13, 15, 42, tzinfo=timezone.utc)
    assert run_files(Path("r"), "gpu", now=now) == (
        Path("r/gpu/2026-11-23-131542Z.json"),
        Path("r/gpu/2026-11-23-131542Z.md"),
    )
    assert run_files(Path("r"), "cpu", "h100-idle", now=now)[0] == Path("r/cpu/2026-11-23-h100-idle.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_gpu_mode_fails_fast_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--mode", "gpu", "--out-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@dataclass
class _RunsOutAbove:
    """A variant whose step runs out of memory above `limit` sequences."""

    name: str
    k: int | None
    limit: int
    trainer: object = field(
        default_factory=lambda: SimpleNamespace(model=torch.nn.Linear(1, 1), ref_model=torch.nn.Linear(1, 1))
    )

    def step(self, inputs: dict) -> dict:
        if inputs["prompt_ids"].shape[0] > self.limit:
            raise torch.OutOfMemoryError("fake")
        return {"loss": 0.0, "kl": 0.0}


def test_largest_fits_stops_each_variant_at_its_first_oom(smoke):
    bench = Bench(
        replace(SMOKE, fit_batches=(4, 8, 16)),
        torch.device("cpu"),
        [_RunsOutAbove("trl k3", None, 16), _RunsOutAbove("rb naive", None, 4), _RunsOutAbove("tike naive", 16, 8)],
    )
    fits = largest_fits(bench)
    tried = {(f["variant"], f["tokens"] // (SMOKE.prompt + SMOKE.completion)): f["fits"] for f in fits}
    assert tried == {
        ("trl k3", 4): True,
        ("trl k3", 8): True,
        ("trl k3", 16): True,
        ("rb naive", 4): True,
        ("rb naive", 8): False,
        ("tike naive", 4): True,
        ("tike naive", 8): True,
        ("tike naive", 16): False,
    }
    assert all((f["peak_mem_bytes"] is None) == (not f["fits"]) for f in fits)
    table = markdown_table({**smoke[1], "fits": fits})
    assert "| rb naive |  | " in table and table.count(" OOM |") == 2


def test_a_variant_out_of_memory_is_reported_not_fatal(smoke, tmp_path):
    bench = Bench(
        SMOKE,
        torch.device("cpu"),
        [_RunsOutAbove("backbone", None, 8), _RunsOutAbove("trl k3", None, 8), _RunsOutAbove("rb naive", None, 1)],
    )
    rows = measure(bench, synthetic_batch(SMOKE, 2, bench.device))
    assert [r["oom"] for r in rows] == [False, False, True]
    assert rows[2]["time_s"] is None and rows[2]["peak_mem_bytes"] is None and rows[1]["time_s"] > 0
    result = {**smoke[1], "rows": rows}
    assert markdown_table(result).splitlines()[-1].startswith("| rb naive |  | OOM |")
    plot_loss_step(result, tmp_path / "plot.png")


def test_bf16_error_smoke_exact_columns_beat_the_tiles(tmp_path):
    """The bf16 error benchmark runs end to end, and its finding holds at smoke size: TIKE's
    exact columns cut its value and gradient errors against fp64 several-fold, rb is exact."""
    from benchmarks import bf16_error

    result = bf16_error.main(["--smoke", "--out-dir", str(tmp_path), "--run-name", "smoke"])
    assert (tmp_path / next(p.name for p in tmp_path.glob("*smoke.md"))).read_text().count("| tike-mc |") == 2
    rows = {(r["eps"], r["estimator"], r["kernels"]): r for r in result["rows"]}
    for eps in bf16_error.SMOKE.eps:
        assert rows[(eps, "rb", "exact columns")]["token_rel_rms_error"] < 0.01
        for tail in ("drop", "sampled", "mc"):
            before, after = rows[(eps, f"tike-{tail}", "tiles only")], rows[(eps, f"tike-{tail}", "exact columns")]
            assert after["token_rel_rms_error"] < before["token_rel_rms_error"] / 3
            assert after["grad_rel_error"] < before["grad_rel_error"] / 3


@pytest.mark.slow
def test_kl_gradient_training_smoke(tiny_model_dir, tmp_path):
    """The token-vs-sequence training comparison runs end to end on the tiny model: every
    configuration trains, is evaluated before and after, and lands in the table and the plot."""
    from benchmarks import kl_gradient_training

    plot = tmp_path / "plot.png"
    result = kl_gradient_training.main(
        ["--smoke", "--model", str(tiny_model_dir), "--out-dir", str(tmp_path), "--plot", str(plot)]
    )
    assert [(s["estimator"], s["kl_gradient"]) for s in result["summary"]] == kl_gradient_training.CONFIGS
    for run in result["runs"]:
        assert [h["step"] for h in run["held_out"]] == [0, 1]
        assert all(h["sequence_kl"] > -1e-6 for h in run["held_out"])  # an exact KL, up to rounding
    assert plot.stat().st_size > 0 and len(list(tmp_path.glob("*.md"))) == 1

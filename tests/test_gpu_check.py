"""The prepared GPU check (`benchmarks.gpu_check`) in its CPU smoke mode: every stage runs end to
end and writes the report the GPU run will fill, so that the command cannot rot between GPU
sessions. Also: the time budget and stage timeouts, the wheel set's check, and the documented
device call. No timing assertions."""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import run as gpu_check
from benchmarks.gpu_check import wheels
from benchmarks.gpu_check.settings import GPU, SMOKE

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["cuda-tests", "loss-step", "train", "train-zero3"]
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")  # what the device tool takes back from $OUT


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, device_out = tmp_path_factory.mktemp("gpu-check"), tmp_path_factory.mktemp("OUT")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUT", str(device_out))
        report = gpu_check.main(["--smoke", "--out-dir", str(out), "--run-name", "test"])
    return out, device_out, report


def _stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["name"] == name)


@pytest.mark.slow
def test_smoke_runs_every_stage_and_writes_the_report(smoke):
    out, _, report = smoke
    assert report["result"] == "passed", [(s["name"], s["status"], s.get("note")) for s in report["stages"]]
    (json_path,) = out.glob("*-smoke-test.json")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["files"] == [json_path.name, json_path.with_suffix(".md").name, json_path.with_suffix(".png").name]
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = json_path.with_suffix(".md").read_text()
    for heading in ("## Stages", "## Loss step", "## Training", "## CUDA-only tests"):
        assert heading in md
    assert [s["name"] for s in report["stages"]] == STAGES
    for stage in report["stages"]:
        assert stage["wall_s"] > 0 and stage["estimate_s"] > 0 and stage["timeout_s"] > 0
        assert (out / stage["log"]).stat().st_size > 0
    assert report["environment"]["packages"]["trl"] and report["wall_s"] > 0


@pytest.mark.slow
def test_smoke_cuda_tests_stage_says_why_it_skipped(smoke):
    stage = _stage(smoke[2], "cuda-tests")
    result = stage["result"]
    assert "tests/test_kernels.py" in result["files"]
    assert result["counts"].get("failed", 0) == 0 and result["tests"]
    if not torch.cuda.is_available():
        assert stage["status"] == "skipped" and stage["note"].startswith("no CUDA")
        assert result["counts"] == {"skipped": len(result["tests"])}


@pytest.mark.slow
def test_smoke_loss_step_stage_measures_both_sizes_against_the_targets(smoke):
    stage = _stage(smoke[2], "loss-step")
    assert stage["status"] == "passed"
    sizes = stage["result"]["sizes"]
    assert [s["sequences"] for s in sizes] == [b.sequences for b in SMOKE.bench_sizes]
    small, large = SMOKE.top_ks
    for size in sizes:
        assert size["tokens"] == size["sequences"] * (SMOKE.prompt + SMOKE.completion)
        assert {(r["variant"], r["k"]) for r in size["rows"]} == {
            ("backbone", None),
            ("trl k3", None),
            ("tike", small),
            ("tike", large),
            ("rb tiled", None),
            ("reference forward", None),
        }
        assert all(math.isfinite(r["time_s"]) and r["peak_mem_bytes"] > 0 for r in size["rows"])
        targets = [c for c in size["checks"] if c["kind"] == "target"]
        assert [(c["name"], c["limit"]) for c in targets] == [
            (f"tike k={small} time / k3", 1.02),
            (f"tike k={small} peak / k3", 1.01),
            (f"tike k={large} time / k3", 1.15),
            (f"tike k={large} peak / k3", 1.05),
            ("rb tiled time / k3", 1.05),
            ("rb tiled peak / k3", 1.01),
        ]
        assert all(c["value"] > 0 for c in targets)
        assert "| trl k3 |" in size["table"]


def _check_runs(runs: list[dict], setups: list[str]) -> None:
    assert [(r["setup"], r["estimator"]) for r in runs] == [(s, e) for s in setups for e in ("k3", "tike", "rb")]
    for run in runs:
        assert "error" not in run, run.get("error")
        assert all(c["ok"] for c in run["checks"]), run["checks"]
        assert [s["step"] for s in run["steps"]] == [1, 2, 3]
        assert all(math.isfinite(s["loss"]) and math.isfinite(s["kl"]) for s in run["steps"])
        # num_iterations=2: steps 1 and 3 start on a fresh generation batch (on-policy, r = 1 exactly
        # in fp32), step 2 reuses it after one update
        passes = {p["step"]: p for p in run["ratio_passes"]}
        assert [passes[s]["on_policy"] for s in (1, 2, 3)] == [True, False, True]
        assert passes[1]["max"] == passes[3]["max"] == 0.0 and passes[1]["tokens"] > 0
        assert passes[2]["max"] > 0  # the update moved the policy: the recording sees real ratios
        assert run["trainer"] == ("GRPOTrainer" if run["estimator"] == "k3" else "TIKEGRPOTrainer")
        if run["estimator"] == "tike":
            assert all(0 < s["kl/topk_mass"] <= 1 for s in run["steps"])


@pytest.mark.slow
def test_smoke_training_stages_record_on_policy_ratios(smoke):
    train = _stage(smoke[2], "train")
    assert train["status"] == "passed"
    _check_runs(train["result"]["runs"], ["plain", "lora"])
    zero3 = _stage(smoke[2], "train-zero3")
    pytest.importorskip("deepspeed")
    assert zero3["status"] == "passed"
    _check_runs(zero3["result"]["runs"], ["zero3"])
    assert all(r["distributed_type"] == "DEEPSPEED" and r["head_sharded"] for r in zero3["result"]["runs"])


@pytest.mark.slow
def test_smoke_copies_its_files_to_the_device_out_folder(smoke):
    _, device_out, report = smoke
    files = sorted(p.name for p in device_out.iterdir())
    assert len(files) <= 8 and all(SAFE_NAME.fullmatch(f) for f in files)
    assert set(report["files"]) | {s["log"] for s in report["stages"]} == set(files)


def test_out_of_budget_stages_are_skipped_and_reported(tmp_path):
    report = gpu_check.run_check(SMOKE, tmp_path, "budget", tuple(STAGES), budget_s=gpu_check.MIN_STAGE_S - 1)
    assert [s["status"] for s in report["stages"]] == ["skipped"] * 4
    assert all(s["note"].startswith("not started") for s in report["stages"])
    assert json.loads((tmp_path / f"{report['run']}.json").read_text())["stages"] == report["stages"]


def test_a_rerun_gets_a_new_name_and_overwrites_nothing(tmp_path):
    first = gpu_check.main(["--smoke", "--out-dir", str(tmp_path), "--run-name", "again", "--stages", ""])
    second = gpu_check.main(["--smoke", "--out-dir", str(tmp_path), "--run-name", "again", "--stages", ""])
    assert second["run"] == first["run"] + "-2"
    assert json.loads((tmp_path / f"{first['run']}.json").read_text())["run"] == first["run"]
    assert {s["status"] for s in second["stages"]} == {"not selected"} and second["result"] == "passed"


def test_a_stage_past_its_timeout_is_stopped_and_reported(tmp_path, monkeypatch):
    stages = tuple(replace(s, timeout_s={**s.timeout_s, "smoke": 1}) for s in gpu_check.STAGES)
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    report = gpu_check.run_check(SMOKE, tmp_path, "timeout", ("train",))
    stage = _stage(report, "train")
    assert stage["status"] == "timeout" and stage["wall_s"] < 30
    assert report["result"] == "problems in train"
    assert [s["status"] for s in report["stages"]] == ["not selected", "not selected", "timeout", "not selected"]
    assert "| train | timeout |" in (tmp_path / f"{report['run']}.md").read_text()


# ---- the wheels the GPU machine lacks ----


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        z.writestr(f"{dist}-{version}.dist-info/METADATA", "Metadata-Version: 2.1\n" + "\n".join(lines) + "\n")
    return path


def test_wheel_check_wants_exactly_the_set_with_every_requirement_met(tmp_path):
    for name, version in {**wheels.WHEELS, **wheels.BUILT}.items():
        requires = ["transformers>=4.56.2", "torch>=2.0", "dill>=0.3", 'uvloop; sys_platform == "win32"']
        _fake_wheel(tmp_path, name, version, requires if name == "trl" else [])
    assert wheels.check(tmp_path) == []
    _fake_wheel(tmp_path, "extra-thing", "1.0", ["not-on-the-image>=1", "transformers>=6", "huggingface-hub<1"])
    (tmp_path / f"hjson-{wheels.WHEELS['hjson']}-py3-none-any.whl").unlink()
    _fake_wheel(tmp_path, "dill", "0.3.0")
    problems = "\n".join(wheels.check(tmp_path))
    for expected in (
        "missing: hjson==",
        "not in the list: extra_thing-1.0",
        "needs not-on-the-image>=1: neither carried nor on the image",
        "needs transformers>=6: 5.17.0 on the image",
        "needs huggingface-hub<1: 1.33.0 on the image",
        "two wheels of dill",
    ):
        assert expected in problems


# ---- the documented device call ----


def test_docs_give_a_device_call_that_fits_the_tool():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = text.split("## The GPU check", 1)[1]
    call = json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))
    assert len(call["command"]) <= 2000 and "benchmarks/gpu_check.sh" in call["command"]
    assert call["carry"] == [".whl"] and 0 < call["timeout_s"] <= 600
    assert call["timeout_s"] >= GPU.budget_s + 30  # the stages' budget, the install and the report fit in it
    for name, version in {**wheels.WHEELS, **wheels.BUILT}.items():
        assert f"| {name} | {version} |" in section, name
    assert ".whl/" in (ROOT / ".gitignore").read_text().splitlines()

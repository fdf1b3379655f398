"""The CUDA-only tests: every test marked `gpu` (`pytest -m gpu`) in the test files that have one,
i.e. the tiled heads through TRL's Triton tile kernels, in fp32 and bf16, against the dense
formulas. Without CUDA they all skip, and the stage says so."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gpu_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test files that mark a test `gpu` (so that new GPU tests join the check by themselves)."""
    return sorted(str(p.relative_to(ROOT)) for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text())


class _Record:
    """A pytest plugin that keeps one outcome per test and emits after each one."""

    def __init__(self, emit: Callable[[dict], None], result: dict) -> None:
        self.emit, self.result = emit, result

    def pytest_runtest_logreport(self, report) -> None:
        # one entry per test: its call, or the setup/teardown phase that failed or skipped it
        if report.when != "call" and report.passed:
            return
        entry = {"test": report.nodeid, "outcome": report.outcome, "when": report.when, "duration_s": report.duration}
        if report.failed:
            entry["message"] = report.longreprtext[-1500:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            entry["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        tests = self.result["tests"]
        if tests and tests[-1]["test"] == report.nodeid and tests[-1]["outcome"] != "passed":
            return  # a test that failed in its call and again in its teardown counts once
        tests.append(entry)
        self.result["counts"] = dict(Counter(t["outcome"] for t in tests))
        self.emit(self.result)


def run(emit: Callable[[dict], None]) -> dict:
    import pytest
    import torch

    files = gpu_test_files()
    result: dict = {
        "files": files,
        "command": f"python -m pytest -m gpu {' '.join(files)}",
        "cuda": torch.cuda.is_available(),
        "tests": [],
        "counts": {},
    }
    emit(result)
    code = pytest.main(
        ["-m", "gpu", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *files], plugins=[_Record(emit, result)]
    )
    counts = result["counts"]
    result["exit_code"] = int(code)
    if not result["cuda"]:
        result["skipped"] = f"no CUDA: {counts.get('skipped', 0)} GPU tests skipped"
    result["checks"] = [
        {"name": "no test failed", "kind": "correctness", "ok": counts.get("failed", 0) == 0, "value": counts},
        *(
            [{"name": "GPU tests ran", "kind": "correctness", "ok": counts.get("passed", 0) > 0, "value": counts}]
            if result["cuda"]
            else []
        ),
    ]
    emit(result)
    return result

"""Where a benchmark run's files go: `<out_dir>/<UTC date>-<run name>.json` and `.md`, the run
name defaulting to the UTC time, so that every run gets its own files and none is overwritten."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_run_arguments(parser: argparse.ArgumentParser, results: str) -> None:
    """`--run-name` and `--out-dir` (default `benchmarks/results/<results>`), as every benchmark takes them."""
    parser.add_argument("--run-name", default=None, help="file name of this run (default: the UTC time)")
    parser.add_argument("--out-dir", default=str(RESULTS / results))


def run_stem(out_dir: Path, run_name: str | None = None, now: datetime | None = None) -> Path:
    now = now or datetime.now(timezone.utc)
    return Path(out_dir) / f"{now:%Y-%m-%d}-{run_name or f'{now:%H%M%S}Z'}"


def with_suffix(stem: Path, suffix: str) -> Path:
    """`stem` plus `suffix` (a run name may hold dots: `Path.with_suffix` would replace its tail)."""
    return stem.parent / f"{stem.name}{suffix}"


def write_run(out_dir: Path, run_name: str | None, result: dict, table: str) -> tuple[Path, Path]:
    """The result as JSON and its markdown table, side by side; returns both paths."""
    stem = run_stem(out_dir, run_name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = with_suffix(stem, ".json"), with_suffix(stem, ".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(table)
    return json_path, md_path

"""The GPU check's report: one JSON file (everything), a markdown summary and a PNG, rewritten
after every stage, so that a check cut off midway still leaves what its earlier stages found."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from ..run_files import with_suffix

STATUS_OK = ("passed", "skipped")


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write(report: dict, stem: Path) -> list[Path]:
    """`<stem>.png`, `.md` and `.json` (last, so that it holds any plot error); returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (with_suffix(stem, suffix) for suffix in (".json", ".md", ".png"))
    try:
        plot(report, png_path)
        report.pop("plot_error", None)
    except Exception as exc:  # a plot must never cost the report
        report["plot_error"] = f"{type(exc).__name__}: {exc}"
    md_path.write_text(markdown(report) + "\n")
    write_json(json_path, report)
    return [p for p in (json_path, md_path, png_path) if p.exists()]


def copy_out(paths: list[Path]) -> None:
    """Also into $OUT, where the device tool takes files back from (flat: at most 8 files)."""
    out = os.environ.get("OUT")
    if out:
        for path in paths:
            if path.exists():
                shutil.copyfile(path, Path(out) / path.name)


def _stage(report: dict, name: str) -> dict:
    return next((s for s in report["stages"] if s["name"] == name), {})


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


def _size(n) -> str:
    return "" if n is None else f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def _line(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(report: dict) -> str:
    env = report["environment"]
    versions = " · ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    lines = [
        f"# GPU check `{report['run']}` ({report['settings']['name']} settings)",
        "",
        f"{env['device']} · python {env['python']} · {versions}",
        "",
        f"Started {report['started_utc']}; wall {_fmt(report.get('wall_s'), 4)} s of a {report['budget_s']} s budget"
        + (f" (+ {env['install_s']} s installing the wheels)" if env.get("install_s") else "")
        + f"; result: **{report['result']}**.",
        "",
        "## Stages",
        "",
        _line(["stage", "status", "wall s", "estimate s", "timeout s", "note"]),
        _line(["---"] * 6),
    ]
    for s in report["stages"]:
        lines.append(
            _line(
                [
                    s["name"],
                    s["status"],
                    _fmt(s.get("wall_s"), 3),
                    s["estimate_s"],
                    _fmt(s.get("timeout_s"), 3),
                    s.get("note", "").replace("|", "/").replace("\n", " ")[:200],
                ]
            )
        )
    lines += _benchmark_section(_stage(report, "loss-step"), report["settings"]["name"] == "smoke")
    lines += _training_section([_stage(report, "train"), _stage(report, "train-zero3")])
    lines += _tests_section(_stage(report, "cuda-tests"))
    return "\n".join(lines)


def _benchmark_section(stage: dict, smoke: bool) -> list[str]:
    sizes = (stage.get("result") or {}).get("sizes", [])
    if not sizes:
        return []
    lines = [
        "",
        "## Loss step: ratios to TRL's k3 against the targets",
        "",
        *(
            ["CPU smoke run: the targets are for a GPU; here the ratios only show that the stage works.", ""]
            if smoke
            else []
        ),
        _line(["tokens", "check", "ratio", "target", "met"]),
        _line(["---"] * 5),
    ]
    for size in sizes:
        for c in size["checks"]:
            if c["kind"] == "target":
                met = "yes" if c["ok"] else "no" if c["value"] is not None else "not measured"
                lines.append(_line([size["tokens"], c["name"], _fmt(c["value"]), f"≤ {c['limit']}", met]))
    for size in sizes:
        lines += ["", f"{size['sequences']} sequences ({size['tokens']} tokens), `benchmarks.loss_step`'s table:", ""]
        lines += [size["table"]]
    return lines


def _training_section(stages: list[dict]) -> list[str]:
    runs = [r for s in stages for r in (s.get("result") or {}).get("runs", [])]
    if not runs:
        return []
    lines = [
        "",
        "## Training: 3 steps each, num_iterations=2 (π_old's log-probs from generation time)",
        "",
        "|r − 1| = |exp(logp − logp_old) − 1| over the completion tokens of each loss pass; on-policy: the "
        "first pass on a fresh generation batch, where it must be 0.",
        "",
        _line(
            [
                "setup",
                "estimator",
                "loss per step",
                "kl per step",
                "top-k mass",
                "on-policy max abs(r − 1)",
                "off-policy max abs(r − 1)",
                "build s",
                "train s",
                "peak memory",
                "checks",
            ]
        ),
        _line(["---"] * 11),
    ]
    for r in runs:
        if "error" in r:
            lines.append(_line([r["setup"], r["estimator"], f"error: {r['error'][:150]}", *[""] * 7, "failed"]))
            continue
        steps, passes = r["steps"], r["ratio_passes"]
        on = [p["max"] for p in passes if p["on_policy"]]
        off = [p["max"] for p in passes if not p["on_policy"]]
        mass = [s["kl/topk_mass"] for s in steps if "kl/topk_mass" in s]
        failed = [c["name"] for c in r["checks"] if not c["ok"]]
        lines.append(
            _line(
                [
                    r["setup"],
                    r["estimator"] + (" (TRL)" if r["estimator"] == "k3" else ""),
                    " / ".join(_fmt(s.get("loss")) for s in steps),
                    " / ".join(_fmt(s.get("kl")) for s in steps),
                    _fmt(sum(mass) / len(mass)) if mass else "",
                    _fmt(max(on)) if on else "",
                    _fmt(max(off)) if off else "",
                    _fmt(r["build_s"], 2),
                    _fmt(r["train_s"], 2),
                    _size(r.get("peak_mem_bytes")),
                    "ok" if not failed else "failed: " + "; ".join(failed),
                ]
            )
        )
    return lines


def _tests_section(stage: dict) -> list[str]:
    result = stage.get("result") or {}
    if not result.get("tests"):
        return []
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result["counts"].items()))
    lines = ["", "## CUDA-only tests", "", f"`{result['command']}`: {counts}."]
    failed = [t for t in result["tests"] if t["outcome"] == "failed"]
    if failed:
        lines += ["", "Failed:", ""] + [f"- `{t['test']}` ({t['when']})" for t in failed]
    reasons = sorted({t.get("reason", "") for t in result["tests"] if t["outcome"] == "skipped"})
    if reasons:
        lines += ["", "Skip reasons: " + "; ".join(r for r in reasons if r) + "."]
    return lines


def plot(report: dict, path: Path) -> None:
    """Step time and peak memory over k3 per variant and size, with the targets; kl per training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = (_stage(report, "loss-step").get("result") or {}).get("sizes", [])
    runs = [r for n in ("train", "train-zero3") for r in (_stage(report, n).get("result") or {}).get("runs", [])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, what in zip(axes[:2], ("time", "peak")):
        names, width = [], 0.8 / max(len(sizes), 1)
        for i, size in enumerate(sizes):
            checks = [c for c in size["checks"] if c["kind"] == "target" and c["name"].endswith(f"{what} / k3")]
            names = [c["name"].removesuffix(f" {what} / k3") for c in checks]
            xs = [j + i * width for j in range(len(checks))]
            ax.bar(xs, [c["value"] or 0 for c in checks], width, label=f"{size['tokens']} tokens")
            ax.scatter(xs, [c["limit"] for c in checks], marker="_", s=400, color="red", zorder=3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(names))], names, fontsize=8)
        ax.set_ylabel(f"{'step time' if what == 'time' else 'peak memory'} / TRL k3 (red: target)")
        if sizes:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    for r in runs:
        steps = r.get("steps", [])
        if steps:
            ax.plot([s["step"] for s in steps], [s.get("kl", math.nan) for s in steps], "o-", label=_run_label(r))
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("logged kl per training step")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"GPU check {report['run']}: {report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_label(run: dict) -> str:
    return f"{run['setup']} {run['estimator']}"

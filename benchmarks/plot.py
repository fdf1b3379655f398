"""Peak memory and step time against k, from a `benchmarks.loss_step` result: measured points
only (the TIKE paper's Figure 5, drawn from measurements).

    python -m benchmarks.plot benchmarks/results/cpu/<run>.json docs/loss_step_cpu.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# variants without a k: drawn as horizontal lines (their measured value, the same at every k)
FLAT = {
    "trl k3": ("black", "-"),
    "rb tiled": ("tab:green", "--"),
    "rb naive": ("tab:red", "--"),
    "backbone": ("grey", ":"),
}


def plot_loss_step(result: dict, path: Path) -> None:
    rows = [r for r in result["rows"] if not r["oom"]]  # a variant that ran out of memory has no point
    tike = sorted((r for r in rows if r["variant"] == "tike"), key=lambda r: r["k"])
    naive = [r for r in rows if r["variant"] == "tike naive"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # on a CPU, the process's CPU time: on a shared machine other work stretches the wall time
    on_cpu = rows[0]["cpu_time_s"] is not None
    time_panel = ("cpu_time_s", 1e-3, "step CPU time (ms)") if on_cpu else ("time_s", 1e-3, "step time (ms)")
    panels = [("peak_mem_bytes", 2**20, "peak memory (MiB)"), time_panel]
    for ax, (key, unit, label) in zip(axes, panels):
        for name, (color, style) in FLAT.items():
            for r in rows:
                if r["variant"] == name:
                    ax.axhline(r[key] / unit, color=color, linestyle=style, linewidth=1.2, label=name)
        ax.plot([r["k"] for r in tike], [r[key] / unit for r in tike], "o-", color="tab:blue", label="tike (tiled)")
        ax.plot(
            [r["k"] for r in naive],
            [r[key] / unit for r in naive],
            "s",
            color="tab:red",
            markersize=8,
            label="tike naive (logits + topk)",
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (top-k size)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    tokens = result["micro_batch"]["tokens"]
    fig.suptitle(f"One GRPO loss micro-step, {tokens} tokens, {result['mode']} mode: {result['device']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.plot RESULT.json OUT.png")
    plot_loss_step(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))

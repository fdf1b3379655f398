"""What a training run leaves behind besides the model: one JSON line of metrics per logged step
(`metrics.jsonl`), a compact line per step under the progress bar, and `training.png` (reward and
KL curves)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

# the per-step numbers worth a glance while training; everything TRL logs goes to metrics.jsonl
SHOWN = ("reward", "kl", "kl/topk_mass", "completions/mean_length")


class MetricsFile(TrainerCallback):
    """Appends every training log (TRL's metrics, the step and the elapsed seconds) to a JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.start = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:  # skip the end-of-run summary
            return
        record = {"step": state.global_step, "elapsed_s": round(time.monotonic() - self.start, 2), **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class CompactProgress(ProgressCallback):
    """transformers' progress bar, printing the few metrics in `SHOWN` per step instead of TRL's
    40-key log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs or "reward" not in logs:
            return
        shown = "  ".join(
            f"{key.split('/')[-1] if key != 'kl/topk_mass' else 'topk_mass'} {logs[key]:.4g}"
            for key in SHOWN
            if key in logs
        )
        self.training_bar.write(f"step {state.global_step:>4}  {shown}")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Reward (with a running mean) and KL (with the top-k mass, for tike) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "reward" in r]
    steps = [r["step"] for r in rows]
    reward = [r["reward"] for r in rows]
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_r.plot(steps, reward, ".", color="tab:blue", alpha=0.4, label="mean reward per step")
    window = max(1, len(rows) // 8)
    ax_r.plot(steps, _running_mean(reward, window), color="tab:blue", label=f"running mean ({window} steps)")
    ax_r.set(xlabel="step", ylabel="reward", title="reward")
    ax_r.legend(loc="lower right", fontsize=8)
    if any("kl" in r for r in rows):
        ax_kl.plot(steps, [r.get("kl", math.nan) for r in rows], color="tab:red", label="kl")
        ax_kl.set(xlabel="step", ylabel="KL(π_θ‖π_ref) per token", title="KL to the reference")
        if any("kl/topk_mass" in r for r in rows):
            mass = ax_kl.twinx()
            mass.plot(steps, [r.get("kl/topk_mass", math.nan) for r in rows], color="tab:gray", lw=1, alpha=0.7)
            mass.set_ylabel("top-k mass (grey)")
        ax_kl.legend(loc="upper left", fontsize=8)
    else:
        ax_kl.set_axis_off()
        ax_kl.text(0.5, 0.5, "no KL logged (beta = 0)", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

"""What the GPU check runs, at full size (`GPU`, one H200) and at the CPU smoke size (`SMOKE`).

Each stage's time estimate and timeout are in `run.STAGES` (the GPU estimates were written before
any run: the first real run's per-stage wall times replace them); `budget_s` caps all stages.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchSize:
    """One micro-batch size of the loss-step stage: sequences of (prompt + completion) tokens,
    timed steps per variant (median) after `warmup` untimed rounds."""

    sequences: int
    repeats: int
    warmup: int = 1


@dataclass(frozen=True)
class Target:
    """A ratio to TRL's k3 step that a variant must stay under (docs/benchmarks.md, GPU targets)."""

    variant: str
    k: int | None
    time: float
    peak: float


@dataclass(frozen=True)
class Settings:
    name: str  # "gpu" or "smoke"
    device: str
    dtype: str
    model: str  # "qwen2.5-1.5b" (its geometry, random weights) or "smoke" (loss_step's smoke model)
    # the loss-step stage (benchmarks.loss_step's build and measure)
    prompt: int
    completion: int
    bench_sizes: tuple[BenchSize, ...]
    top_ks: tuple[int, int]  # TIKE's small and large k
    # the training stages
    train_completion: int
    train_steps: int = 3
    train_batch: int = 4  # per device; one prompt's 4 completions per step
    num_generations: int = 4
    num_iterations: int = 2  # so TRL computes π_old's log-probs at generation time
    learning_rate: float = 1e-4
    beta: float = 1e-3
    tike_top_k: int = 16
    # seconds for all stages: with a few seconds installing the wheels, the command stays under 5 minutes
    budget_s: int = 285

    @property
    def geometry(self):
        """benchmarks.loss_step's Geometry (imported here only: the command itself stays light)."""
        from benchmarks.loss_step import MODES, QWEN25_15B

        return QWEN25_15B if self.model == "qwen2.5-1.5b" else MODES["smoke"].geometry

    @property
    def targets(self) -> tuple[Target, ...]:
        small, large = self.top_ks
        return (
            Target("tike", small, time=1.02, peak=1.01),
            Target("tike", large, time=1.15, peak=1.05),
            Target("rb tiled", None, time=1.05, peak=1.01),
        )


GPU = Settings(
    name="gpu",
    device="cuda",
    dtype="bfloat16",
    model="qwen2.5-1.5b",
    prompt=256,
    completion=1792,
    bench_sizes=(BenchSize(8, repeats=3), BenchSize(32, repeats=2)),
    top_ks=(16, 1024),
    train_completion=16,
)

SMOKE = Settings(
    name="smoke",
    device="cpu",
    dtype="float32",
    model="smoke",  # vocabulary 1000, hidden 16, 1 layer
    prompt=4,
    completion=12,
    bench_sizes=(BenchSize(2, repeats=1, warmup=1), BenchSize(4, repeats=1, warmup=0)),
    top_ks=(16, 64),  # k = 1024 exceeds the smoke vocabulary
    train_completion=8,
    budget_s=240,
)
SETTINGS = {s.name: s for s in (GPU, SMOKE)}

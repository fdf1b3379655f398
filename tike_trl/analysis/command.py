"""`tike-trl analyze`: does the top-k truncation hold on your models, and how do the KL estimators
compare? Samples a pool of completions from the policy per prompt, scores every position with
dense logits against the reference (a chunk of positions at a time), and writes a markdown
report, JSON and PNG plots (TIKE Tables 2 and 7, Figures 2 and 4; the Rao-Blackwellized KL
paper's estimation table and gradient variance).

The models, prompts and sampling live in :mod:`tike_trl.analysis.sampling`, the math in
:mod:`tike_trl.analysis.diagnostics`, the outputs in :mod:`tike_trl.analysis.report`; this module
holds the settings, arranges the chunks and runs the command.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..extras import require
from . import diagnostics
from .sampling import (
    SHIFTED_POLICY_TEMPERATURE,
    TRAIN_OUTPUT_DIR,
    LanguageModel,
    Models,
    Pool,
    arithmetic_prompts,
    dataset_prompts,
    encode_prompt,
    load_models,
    reference_states,
    sample_pool,
    stop_ids,
)

DEFAULT_KS = (8, 16, 64, 256)
# the bootstraps draw their own streams (seed + 1 or 2 times this), so that neither the sampled pool
# nor the bias-variance section depends on the gradient section (--no-gradients, or its rows)
RESAMPLING_SEED_OFFSET = 1_000_003


@dataclass
class AnalysisConfig:
    """Settings of one analysis; `tike-trl analyze --help` describes each."""

    policy: str | None = None
    ref: str | None = None
    policy_temperature: float | None = None
    temperature: float = 1.0
    prompts: int = 8
    dataset: str | None = None
    dataset_split: str = "train"
    completion_len: int = 32
    pool: int = 32
    ks: Sequence[int] = DEFAULT_KS
    tike_k: int = 16
    bootstrap: int = 1000
    grad_batch: int = 8
    gradients: bool = True
    chunk_positions: int = 512
    sample_batch: int = 64
    seed: int = 0
    output_dir: str = "outputs/analyze"

    def __post_init__(self) -> None:
        self.ks = tuple(sorted(set(self.ks)))
        for name in (
            "prompts",
            "completion_len",
            "pool",
            "bootstrap",
            "grad_batch",
            "tike_k",
            "chunk_positions",
            "sample_batch",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"k={list(self.ks)!r} must be one or more integers >= 1.")
        if self.pool < 2:
            raise ValueError(f"pool={self.pool!r} must be at least 2 sequences per prompt (variances need two).")
        if self.gradients and self.grad_batch < 2:
            raise ValueError(f"grad_batch={self.grad_batch!r} must be at least 2 (the leave-one-out baseline).")
        for name in ("temperature", "policy_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0.")


def sequence_chunks(lengths: torch.Tensor, max_positions: int) -> Iterator[slice]:
    """Consecutive groups of whole sequences holding at most `max_positions` positions (or one sequence)."""
    start, total = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total and total + n > max_positions:
            yield slice(start, i)
            start, total = i, 0
        total += n
    if start < len(lengths):
        yield slice(start, len(lengths))


# ---- the analysis ----


def bootstrap_sizes(pool: int) -> list[int]:
    """Sample counts M on a 1-2-5 grid up to the pool size, as in TIKE Figure 4's log axis."""
    grid = [m * 10**e for e in range(6) for m in (1, 2, 5)]
    return sorted({m for m in grid if m <= pool} | {pool})


def sample_and_score(
    models: Models,
    prompt_ids: torch.Tensor,
    ks: Sequence[int],
    config: AnalysisConfig,
    generator: torch.Generator,
    bar: tqdm,
) -> tuple[Pool, diagnostics.ChunkScores, float]:
    """One prompt: its pool of completions, their scores, and the seconds spent sampling."""
    started = time.perf_counter()
    stop = stop_ids(models.policy.model, models.tokenizer)
    parts = [
        sample_pool(
            models.policy,
            prompt_ids,
            min(config.sample_batch, config.pool - start),
            config.completion_len,
            stop,
            generator,
            bar,
        )
        for start in range(0, config.pool, config.sample_batch)
    ]
    pool = Pool(*(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "layout", "policy_states")))
    pool.ref_states = pool.policy_states if models.shared else reference_states(models.ref, prompt_ids, pool.tokens)
    sampling_s = time.perf_counter() - started
    bar.set_postfix_str("scoring")
    scores = score_pool(pool, models.policy, models.ref, ks, config)
    bar.set_postfix_str("")
    return pool, scores, sampling_s


def run_analysis(config: AnalysisConfig, tokenizer=None, prompts: list | None = None) -> dict:
    """Run the analysis and return its results as a JSON-ready dict (written out by `report.write_report`).
    `tokenizer` and `prompts` override the policy's tokenizer and the configured prompts."""
    started = time.perf_counter()
    models = load_models(config, tokenizer)
    if prompts is None:
        prompts = (
            dataset_prompts(config.dataset, config.dataset_split, config.prompts)
            if config.dataset
            else arithmetic_prompts(config.prompts, config.seed)
        )
    prompt_ids = [encode_prompt(p, models.tokenizer) for p in prompts]
    generator = torch.Generator().manual_seed(config.seed)
    value_resampling = torch.Generator().manual_seed(config.seed + RESAMPLING_SEED_OFFSET)
    gradient_resampling = torch.Generator().manual_seed(config.seed + 2 * RESAMPLING_SEED_OFFSET)
    sizes = bootstrap_sizes(config.pool)
    ks = sorted(set(config.ks) | {config.tike_k})

    stats, per_prompt, grad_spreads, profile, sampling_s = [], [], [], None, 0.0
    steps = len(prompts) * len(range(0, config.pool, config.sample_batch)) * config.completion_len
    with tqdm(total=steps, desc="tike-trl analyze: sampling", unit="token step") as bar:
        for prompt, ids in zip(prompts, prompt_ids):
            pool, scores, seconds = sample_and_score(models, ids, ks, config, generator, bar)
            sampling_s += seconds
            stats.append(scores.stats)
            per_prompt.append(
                {
                    "prompt": _prompt_text(prompt),
                    "mean_length": pool.layout.sum(1).float().mean().item(),
                    **diagnostics.bias_variance(scores.sequence_values, sizes, config.bootstrap, value_resampling),
                }
            )
            if scores.gradients is not None:
                grad_spreads.append(
                    diagnostics.gradient_spread(
                        scores.gradients, config.grad_batch, config.bootstrap, gradient_resampling
                    )
                )
            if profile is None:
                profile = _profile(
                    pool, scores.stats, ks.index(config.tike_k), config.tike_k, models.tokenizer, prompt
                )
    all_stats = diagnostics.PositionStats.cat(stats)
    total_s = time.perf_counter() - started
    return {
        "setup": {
            **asdict(config),
            "ks": list(config.ks),
            **models.names,
            "vocab_size": models.policy.head.weight.shape[0],
            "positions": len(all_stats.exact),
            "sequences": config.pool * len(prompts),
            "gradient_parameters": _grad_parameters(models.policy) if config.gradients else None,
        },
        "coverage": {
            "ks": ks,
            "tike_k": config.tike_k,
            "table": diagnostics.coverage_table(all_stats, ks),
            "identity_max_abs_error": diagnostics.identity_error(all_stats),
            "mean_exact_kl": all_stats.exact.mean().item(),
        },
        "bias_variance": {
            "sizes": sizes,
            "unbiased": list(diagnostics.UNBIASED_ESTIMATORS),
            "prompts": per_prompt,
            "summary": _summarise_bias_variance(per_prompt),
        },
        "gradient": _summarise_gradients(grad_spreads, config.grad_batch) if grad_spreads else None,
        "profile": profile,
        "timing": {"sampling_s": sampling_s, "scoring_s": total_s - sampling_s, "total_s": total_s},
    }


def score_pool(
    pool: Pool, policy: LanguageModel, ref: LanguageModel, ks: Sequence[int], config: AnalysisConfig
) -> diagnostics.ChunkScores:
    """Score a pool a chunk of whole sequences at a time (dense [positions, vocab] logits per chunk)."""
    parts = []
    for rows in sequence_chunks(pool.layout.sum(1), config.chunk_positions):
        layout = pool.layout[rows]
        policy_states, ref_states = pool.policy_states[rows][layout], pool.ref_states[rows][layout]
        with torch.no_grad():
            ref_logits = ref.logits(ref_states)
        parts.append(
            diagnostics.score_chunk(
                lambda w: policy.logits(policy_states, w),
                policy.norm.weight if config.gradients else None,
                ref_logits,
                pool.tokens[rows][layout],
                layout,
                ks,
                config.tike_k,
            )
        )

    return diagnostics.ChunkScores(
        diagnostics.PositionStats.cat([p.stats for p in parts]),
        {k: torch.cat([p.sequence_values[k] for p in parts]) for k in parts[0].sequence_values},
        None if parts[0].gradients is None else diagnostics.GradientParts.cat([p.gradients for p in parts]),
    )


def _grad_parameters(policy: LanguageModel) -> dict:
    name = next(n for n, p in policy.model.named_parameters() if p is policy.norm.weight)
    return {"name": name, "numel": policy.norm.weight.numel()}


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " / ".join(m["content"] for m in prompt)


def _profile(pool: Pool, stats: diagnostics.PositionStats, col: int, k: int, tokenizer, prompt) -> dict:
    """Per-position probabilities along the longest sampled sequence of the first prompt (TIKE Figure 2)."""
    lengths = pool.layout.sum(1)
    row = int(lengths.argmax())
    start = int(lengths[:row].sum())
    sl = slice(start, start + int(lengths[row]))
    return {
        "prompt": _prompt_text(prompt),
        "k": k,
        "tokens": tokenizer.convert_ids_to_tokens(pool.tokens[row, : int(lengths[row])].tolist()),
        "top1": stats.top1[sl].tolist(),
        "topk_mass": stats.topk_mass[sl, col].tolist(),
        "p_sampled": stats.p_sampled[sl].tolist(),
        "exact_kl": stats.exact[sl].tolist(),
    }


def _mean_over(items: list[dict]) -> dict:
    """Average nested dicts of numbers (or lists of numbers) key by key."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_over([it[k] for it in items]) for k in first}
    if isinstance(first, list):
        return [sum(col) / len(col) for col in zip(*items)]
    return sum(items) / len(items)


def _summarise_gradients(per_prompt: list[dict], batch: int) -> dict:
    """The gradient section: per prompt and averaged over prompts, and which baseline lowers the
    variance of each estimator's sequence-level gradient (on the averages)."""
    summary = _mean_over(per_prompt)
    return {
        "batch": batch,
        "kinds": list(diagnostics.GRADIENT_KINDS),
        "estimators": list(diagnostics.VALUE_ESTIMATORS),
        "unbiased_sequence": list(diagnostics.UNBIASED_ESTIMATORS),
        "prompts": per_prompt,
        "summary": summary,
        "baselines": diagnostics.baseline_effects(summary, per_prompt),
    }


def _summarise_bias_variance(per_prompt: list[dict]) -> dict:
    """Averaged over prompts: each estimator's estimate, its bias against the pool's exact KL, and its std."""
    summary = {"truth": sum(p["truth"] for p in per_prompt) / len(per_prompt), "estimators": {}}
    for name in per_prompt[0]["estimators"]:
        est = _mean_over([p["estimators"][name] for p in per_prompt])
        bias = _mean_over([[m - p["truth"] for m in p["estimators"][name]["mean"]] for p in per_prompt])
        summary["estimators"][name] = {"mean": est["mean"], "bias": bias, "std": est["std"]}
    return summary


# ---- command line ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tike-trl analyze` options."""
    parser.add_argument(
        "--policy",
        help="policy model (path or Hub id). Default: the model saved by `tike-trl train` in "
        f"{TRAIN_OUTPUT_DIR} if present, else a built-in shifted policy (the reference at temperature "
        f"{SHIFTED_POLICY_TEMPERATURE}).",
    )
    parser.add_argument("--ref", help="reference model (path or Hub id). Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument(
        "--policy-temperature",
        type=float,
        help="divide the policy's logits (only) by this; "
        f"default 1, or {SHIFTED_POLICY_TEMPERATURE} for the built-in shifted policy.",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature, applied to both models' logits as TRL does (default 1.0).",
    )
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8).")
    parser.add_argument(
        "--dataset",
        help="prompts from a dataset with a 'prompt' column (a .json/.jsonl/.csv/.parquet "
        "file or a `datasets` name) instead of the embedded arithmetic task.",
    )
    parser.add_argument("--dataset-split", default="train", help="split of --dataset (default train).")
    parser.add_argument("--completion-len", type=int, default=32, help="maximum completion tokens (default 32).")
    parser.add_argument(
        "--pool", type=int, default=32, help="sequences sampled from the policy per prompt (default 32)."
    )
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(DEFAULT_KS),
        dest="ks",
        help="top-k sizes for the coverage tables (default 8 16 64 256).",
    )
    parser.add_argument("--tike-k", type=int, default=16, help="k of the TIKE estimators compared (default 16).")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples per sample count (default 1000)."
    )
    parser.add_argument(
        "--grad-batch",
        type=int,
        default=8,
        help="sequences per resampled batch in the gradient-variance section, and the group of the "
        "leave-one-out baseline (default 8, at least 2).",
    )
    parser.add_argument("--no-gradients", dest="gradients", action="store_false", help="skip the gradient section.")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling and resampling (default 0).")
    parser.add_argument(
        "--output-dir",
        default="outputs/analyze",
        help="where report.md, results.json and the plots go (default outputs/analyze).",
    )


def run(args: argparse.Namespace) -> int:
    """Run `tike-trl analyze` and write its report."""
    from .report import write_report

    require("matplotlib", "tike-trl analyze (its plots)")  # before the minutes of sampling, not after

    options = {k: v for k, v in vars(args).items() if k in AnalysisConfig.__dataclass_fields__}
    try:
        config = AnalysisConfig(**options)
    except ValueError as error:
        raise InputError(str(error)) from None
    results = run_analysis(config)
    paths = write_report(results, Path(config.output_dir))
    print(
        f"tike-trl analyze: {results['setup']['positions']} positions in {results['timing']['total_s']:.0f} s; "
        f"wrote {', '.join(str(p) for p in paths)}"
    )
    return 0

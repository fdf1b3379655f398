"""`TIKEConfig`: TRL's `GRPOConfig` plus the KL estimator switch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from .estimators import (
    CLIP_MODES,
    ESTIMATORS,
    HEAD_ESTIMATORS,
    KL_GRADIENTS,
    SAMPLED_TOKEN_ESTIMATORS,
    SEQUENCE_BASELINES,
    TAILS,
    check_choice,
    check_top_k,
)


def check_exact_kl_logging(steps: object, kl_estimator: str, beta: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"log_exact_kl_steps={steps!r} must be an integer >= 0 (0 switches it off).")
    if steps and kl_estimator not in HEAD_ESTIMATORS:
        raise ValueError(
            f"log_exact_kl_steps needs kl_estimator 'tike' or 'rb' (the loss-time reference head), "
            f"not {kl_estimator!r}."
        )
    if steps and beta == 0.0:
        raise ValueError("log_exact_kl_steps needs the KL term (beta > 0): with beta=0.0 there is no reference model.")


# generation settings that make tokens come from a processed distribution, and their neutral values
_SAMPLER_PROCESSING = {
    "top_p": (1.0, None),
    "top_k": (0, -1, None),
    "min_p": (0.0, None),
    "repetition_penalty": (1.0, None),
}


def warn_if_not_sampling_the_policy(config: TIKEConfig) -> None:
    """Warn once, naming the setting, when generation does not draw o_t from π_old at the sampling
    temperature: the sampled-token estimators and TIKE's `sampled`/`mc` tails assume it, and no
    importance weight restores tokens that a truncated sampler never draws."""
    uses_sampled_token = config.kl_estimator in SAMPLED_TOKEN_ESTIMATORS or (
        config.kl_estimator == "tike" and config.tike_tail != "drop"
    )
    if config.beta == 0.0 or not uses_sampled_token:
        return
    settings = {name: getattr(config, name) for name in _SAMPLER_PROCESSING}
    settings.update({k: v for k, v in (config.generation_kwargs or {}).items() if k in _SAMPLER_PROCESSING})
    changed = [f"{name}={value!r}" for name, value in settings.items() if value not in _SAMPLER_PROCESSING[name]]
    if changed:
        what = f"kl_estimator={config.kl_estimator!r}" + (
            f" with tike_tail={config.tike_tail!r}" if config.kl_estimator == "tike" else ""
        )
        warnings.warn(
            f"{', '.join(changed)}: completions are sampled from a processed distribution, not from the policy at "
            f"temperature={config.temperature}, which {what} assumes of the sampled token; its KL estimate and "
            "gradient are biased. Use tike_tail='drop' or kl_estimator='rb', which do not read the sampled token, or "
            "sample without these settings.",
            UserWarning,
            stacklevel=3,
        )


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class TIKEConfig(GRPOConfig):
    r"""
    Configuration for [`TIKEGRPOTrainer`]: every `GRPOConfig` field, plus the KL estimator.

    `beta` defaults to 1e-3 (the TIKE paper's setting) instead of TRL's 0.0, which switches the
    KL term off, and an unset `bf16` means fp32 on a machine without CUDA/XPU (TRL would pick bf16
    and refuse to start). The new fields are exposed by `TrlParser` as command-line flags and
    YAML keys.

    Parameters:
        kl_estimator (`str`, defaults to `"tike"`):
            Per-token KL(π_θ‖π_ref) estimator: `"k1"`, `"k2"`, `"k3"` (TRL's), `"rb"` (exact,
            full vocabulary) or `"tike"` (exact over the policy's top-k).
        tike_top_k (`int`, defaults to `16`):
            Size k of the top-k set for `kl_estimator="tike"`.
        tike_tail (`str`, defaults to `"sampled"`):
            What TIKE does beyond the top-k: `"sampled"` adds the sampled token to the set
            (paper §4.3), `"drop"` ignores the tail (paper Eq. 6), `"mc"` adds an importance-
            weighted estimate of the tail from the sampled token (unbiased in value and gradient).
        tike_importance_weight (`bool`, defaults to `True`):
            Multiply by the stop-gradient ratio π_θ(o_t)/π_b(o_t) (paper Eq. 5-6; for `"mc"`,
            the tail term's weight), π_b being the distribution the token was drawn from (see
            `tike_sampler_logprobs`).
        tike_sampler_logprobs (`bool`, defaults to `True`):
            Where the batch carries the generator's own log-probs of the sampled tokens (vLLM, or a
            `rollout_func` that returns `logprobs`), divide by those: the tokens were drawn from
            the sampler, not from the trainer's π_old, and the two differ (other kernels, other
            numerics). `False` always divides by π_old (TRL's `old_per_token_logps`, or the
            current policy when TRL skips them). Tokens whose sampler log-prob is NaN fall back to
            π_old.
        tike_is_clip (`float` or `None`, defaults to `3.0`):
            Upper bound on that ratio, so a stale or mismatched rollout cannot blow the loss up
            (TRL bounds its vLLM ratios at 3.0 too). `None` leaves it unbounded, as in the paper.
            With `num_iterations=1` the ratio is exactly 1 and the bound never acts.
        tike_is_clip_mode (`str`, defaults to `"truncate"`):
            `"truncate"` caps the ratio at `tike_is_clip`; `"mask"` sets it to 0 where it exceeds the
            bound, which drops what the ratio weights: the token's whole KL term for the `"sampled"`
            and `"drop"` tails, the tail estimate for `"mc"` (its top-k sum needs no weight).
        tike_ref_hidden_on_cpu (`bool`, defaults to `False`):
            `tike` and `rb` run the reference backbone once per generation batch (where TRL runs its
            reference pass) and keep its final hidden states with the batch, so that every loss
            pass over it, whatever `num_iterations`, applies only the reference head. They take
            hidden size × 2 bytes per completion token in bf16 (Qwen2.5-7B: 7 KiB; a generation
            batch of 64 completions of 4096 tokens: 1.75 GiB per device); `True` keeps them in CPU
            memory until their micro-batch's loss.
        kl_gradient (`str`, defaults to `"token"`):
            `"token"`: the KL term's gradient holds each token's history fixed, as TRL's and the TIKE
            paper's do; it omits the effect of a token on the KL of the positions after it.
            `"sequence"`: each position's term gains a zero-valued score-function term carrying the
            later positions' KL, so the gradient is the sequence KL's (exactly, in expectation and
            on-policy, for k1, k3 with TRL's ratio, rb and tike with `tike_tail="mc"`). The loss
            value and the `kl` metric are unchanged. No extra forward.
        kl_sequence_baseline (`str`, defaults to `"running_mean"`):
            What the `"sequence"` term subtracts from the later positions' KL, per position: a
            running mean from earlier micro-batches (`"running_mean"`, the lowest gradient variance
            in the measurements of docs/estimators.md), the mean over the other completions of the
            micro-batch (`"loo"`), or nothing (`"none"`). None adds bias.
        log_exact_kl_steps (`int`, defaults to `0`):
            Every this many optimizer steps, also log `kl/exact` (the exact per-token KL over the
            full vocabulary) and `kl/tail_residual` (exact KL minus the top-`tike_top_k` sum, paper
            Eq. 10-12), from the same tiled pass over the policy head: no `[tokens, vocabulary]`
            tensor, no change to the loss. `kl_estimator` `"tike"` or `"rb"` only; 0 switches it off.
    """

    beta: float = field(
        default=1e-3,
        metadata={"help": "KL coefficient. tike-trl defaults to 1e-3 (the TIKE paper); 0.0 switches the KL term off."},
    )
    kl_estimator: str = field(
        default="tike",
        metadata={
            "help": "Per-token KL estimator: 'k1', 'k2', 'k3' (TRL's), 'rb' (exact over the full vocabulary) or "
            "'tike' (exact over the policy's top-k tokens).",
            "choices": list(ESTIMATORS),
        },
    )
    tike_top_k: int = field(default=16, metadata={"help": "Number k of top tokens TIKE sums over exactly."})
    tike_tail: str = field(
        default="sampled",
        metadata={
            "help": "TIKE beyond the top-k: 'sampled' adds the sampled token to the set (paper §4.3), 'drop' ignores "
            "the tail (paper Eq. 6), 'mc' adds an importance-weighted one-sample estimate of the tail (unbiased).",
            "choices": list(TAILS),
        },
    )
    tike_importance_weight: bool = field(
        default=True,
        metadata={
            "help": "Weight TIKE by the stop-gradient ratio π_θ(o_t)/π_b(o_t) (paper Eq. 5-6), π_b the distribution "
            "the token was drawn from (see tike_sampler_logprobs)."
        },
    )
    tike_sampler_logprobs: bool = field(
        default=True,
        metadata={
            "help": "Divide TIKE's importance weight by the generator's own log-probs of the sampled tokens where the "
            "batch carries them (vLLM, a rollout_func returning logprobs); False: always by π_old."
        },
    )
    tike_is_clip: float | None = field(
        default=3.0,
        metadata={
            "help": "Upper bound on TIKE's importance ratio, so a stale rollout cannot blow the loss up; "
            "None: unbounded, as in the paper."
        },
    )
    tike_is_clip_mode: str = field(
        default="truncate",
        metadata={
            "help": "'truncate' caps the ratio at tike_is_clip; 'mask' sets it to 0 above the bound, dropping what it "
            "weights: the token's whole KL term (sampled, drop tails) or the tail estimate (mc).",
            "choices": list(CLIP_MODES),
        },
    )
    tike_ref_hidden_on_cpu: bool = field(
        default=False,
        metadata={
            "help": "Keep the reference's final hidden states (from the one generation-time reference pass, hidden "
            "size x 2 bytes per completion token in bf16) in CPU memory until their micro-batch's loss."
        },
    )

    kl_gradient: str = field(
        default="token",
        metadata={
            "help": "'token': the KL term's gradient holds each token's history fixed (TRL's, the TIKE paper's); "
            "'sequence': plus the effect of each token on the KL of the positions after it, as a score-function "
            "term, so the gradient is that of the sequence KL (docs/estimators.md). The loss value is unchanged.",
            "choices": list(KL_GRADIENTS),
        },
    )
    kl_sequence_baseline: str = field(
        default="running_mean",
        metadata={
            "help": "Baseline subtracted from the future KL in the 'sequence' gradient's score term: 'running_mean' "
            "(per position, from earlier micro-batches; the lowest variance measured), 'loo' (per position, the mean "
            "over the other completions of the micro-batch) or 'none'. Each is independent of the completion, so none "
            "adds bias.",
            "choices": list(SEQUENCE_BASELINES),
        },
    )

    log_exact_kl_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many steps, also log kl/exact (exact KL over the full vocabulary) and "
            "kl/tail_residual (exact KL minus the top-k sum), from the same tiled pass; 'tike' and 'rb' only. "
            "0 switches it off."
        },
    )

    def __post_init__(self) -> None:
        check_choice("kl_estimator", self.kl_estimator, ESTIMATORS)
        check_top_k(self.tike_top_k)
        check_choice("tike_tail", self.tike_tail, TAILS)
        check_choice("tike_is_clip_mode", self.tike_is_clip_mode, CLIP_MODES)
        if self.tike_is_clip is not None and not (
            isinstance(self.tike_is_clip, (int, float)) and self.tike_is_clip > 0
        ):
            raise ValueError(f"tike_is_clip={self.tike_is_clip!r} must be a number > 0, or None for no bound.")
        check_choice("kl_gradient", self.kl_gradient, KL_GRADIENTS)
        check_choice("kl_sequence_baseline", self.kl_sequence_baseline, SEQUENCE_BASELINES)
        check_exact_kl_logging(self.log_exact_kl_steps, self.kl_estimator, self.beta)
        if self.bf16 is None and not self.fp16 and not _has_accelerator():
            self.bf16 = False  # TRL would default to bf16 and fail on a CPU-only machine
        super().__post_init__()
        warn_if_not_sampling_the_policy(self)
        if self.beta == 0.0:
            ignored = f"kl_estimator={self.kl_estimator!r}" + (
                " and kl_gradient='sequence' have" if self.kl_gradient == "sequence" else " has"
            )
            warnings.warn(
                f"beta=0.0 switches the KL term off: {ignored} no effect and no reference model is loaded. The TIKE "
                "paper uses beta=1e-3.",
                UserWarning,
                stacklevel=3,
            )

"""The per-token KL estimators as dense tensor math: the one home of the formulas.

The trainer's tiled kernels only produce log-probabilities at a few indices (the sampled token,
the policy's top-k) and hand them to the functions here, and every kernel is tested against
:func:`kl_estimate` on full logits. `docs/estimators.md` derives each formula.

Notation, one token position: p = π_θ(·|h), q = π_ref(·|h), ℓ_v = log p_v − log q_v, o the
sampled token (drawn from π_old), r = p(o) / π_old(o), S the top-k indices of p (chosen without
gradient), sg = stop-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ESTIMATORS = ("k1", "k2", "k3", "rb", "tike")
# estimators computed from the sampled token's log-probs (TRL's reference pass provides log q(o))
SAMPLED_TOKEN_ESTIMATORS = ("k1", "k2", "k3")
# estimators that apply the reference head at loss time, at the current policy's top-k (or everywhere)
HEAD_ESTIMATORS = ("tike", "rb")
TAILS = ("sampled", "drop", "mc")
CLIP_MODES = ("truncate", "mask")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the field, the value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")


def check_top_k(top_k: object, vocab_size: int | None = None) -> None:
    """`tike_top_k` must be an integer >= 1 and, once the vocabulary is known, no larger than it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"tike_top_k={top_k!r} must be an integer >= 1.")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"tike_top_k={top_k} is larger than the policy's vocabulary ({vocab_size} tokens).")


def p_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p·(log p − log q) elementwise, with 0·log(0/q) = 0 and a finite gradient where p = 0.

    Entries with p = 0 (a −inf logit, e.g. a masked padding row) contribute nothing; where p > 0
    and q = 0 the result is +inf, which is the honest value of the KL, and carries no gradient
    (the gradient of an infinite KL is no direction to move in).
    """
    has_mass = logp > float("-inf")
    finite_q = logq > float("-inf")
    safe_logp = torch.where(has_mass, logp, torch.zeros_like(logp))
    safe_logq = torch.where(finite_q, logq, torch.zeros_like(logq))
    value = safe_logp.exp() * (safe_logp - safe_logq)
    value = torch.where(finite_q, value, torch.full_like(value, float("inf")))
    return torch.where(has_mass, value, torch.zeros_like(value))


def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """D = Σ_v p_v ℓ_v over the last dimension (the Rao-Blackwellized estimator, `rb`)."""
    return p_log_ratio(logp, logq).sum(-1)


def sampled_token_kl(logp_o: torch.Tensor, logq_o: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's k1, k2, k3 from the log-probs of the sampled token (plain forms, no ratio factor).

    k3 is written exactly as TRL writes it (exp(log q − log p) − (log q − log p) − 1), so the
    trainer's k3 matches TRL's bit for bit.
    """
    check_choice("kl_estimator", estimator, SAMPLED_TOKEN_ESTIMATORS)
    if estimator == "k1":
        return logp_o - logq_o
    if estimator == "k2":
        return 0.5 * (logp_o - logq_o) ** 2
    log_ref_ratio = logq_o - logp_o
    return torch.exp(log_ref_ratio) - log_ref_ratio - 1


def trl_ratio(
    logp_o: torch.Tensor,
    old_logp_o: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    level: str = "token",
) -> torch.Tensor:
    """TRL's differentiable importance weight `coef_1` = π_θ(o)/π_old(o), which its
    `use_bias_correction_kl` (on by default) multiplies into k3; 1 in value on-policy
    (`old_logp_o` None), with the gradient of π_θ(o)/sg(π_θ(o)).

    At `level="sequence"` it is exp of the mean log-ratio over `mask`'s tokens, one per sequence
    ([batch, 1]), as TRL's `importance_sampling_level="sequence"`.
    """
    check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    log_ratio = logp_o - (logp_o.detach() if old_logp_o is None else old_logp_o)
    if level == "sequence":
        if mask is None:
            raise ValueError("The sequence-level ratio needs the mask of the tokens it averages over.")
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


def importance_ratio(
    logp_o: torch.Tensor, old_logp_o: torch.Tensor | None, clip: float | None = None, clip_mode: str = "truncate"
) -> torch.Tensor:
    """sg(r) = sg(p(o) / π_old(o)); 1 when `old_logp_o` is None (on-policy).

    `clip` bounds r from above so a stale or mismatched rollout (π_old(o) ≈ 0) cannot blow the
    loss up: ``"truncate"`` caps r at `clip`, ``"mask"`` sets r to 0 where it exceeds `clip` (the
    terms r multiplies are dropped), as TRL's `vllm_importance_sampling_mode` does for its ratios.
    """
    check_choice("tike_is_clip_mode", clip_mode, CLIP_MODES)
    if old_logp_o is None:
        return torch.ones_like(logp_o).detach()
    ratio = torch.exp(logp_o.detach() - old_logp_o.detach())
    if clip is None:
        return ratio
    if clip_mode == "truncate":
        return ratio.clamp(max=clip)
    return torch.where(ratio > clip, torch.zeros_like(ratio), ratio)


@dataclass
class TopKLogProbs:
    """Both models' log-probabilities at the policy's top-k set S and at the sampled token o: all
    that TIKE reads. Shapes: `[..., k]` at S, `[...]` at o."""

    policy: torch.Tensor  # log p_v, v ∈ S (differentiable)
    ref: torch.Tensor  # log q_v, v ∈ S
    policy_sampled: torch.Tensor  # log p(o) (differentiable)
    ref_sampled: torch.Tensor  # log q(o)
    sampled_in_topk: torch.Tensor  # o ∈ S (bool)

    @staticmethod
    def gather(logp: torch.Tensor, logq: torch.Tensor, top: torch.Tensor, sampled: torch.Tensor) -> TopKLogProbs:
        """From full log-probs ([..., V]), the top-k indices ([..., k]) and the sampled ids ([...])."""
        ids = sampled.long().unsqueeze(-1)
        return TopKLogProbs(
            policy=logp.gather(-1, top),
            ref=logq.gather(-1, top),
            policy_sampled=logp.gather(-1, ids).squeeze(-1),
            ref_sampled=logq.gather(-1, ids).squeeze(-1),
            sampled_in_topk=(top == ids).any(-1),
        )

    def topk_sum(self) -> torch.Tensor:
        """Σ_{v∈S} p_v ℓ_v, the truncated KL (TIKE Eq. 10), differentiable."""
        return p_log_ratio(self.policy, self.ref).sum(-1)

    def topk_mass(self) -> torch.Tensor:
        """Σ_{v∈S} p_v, without gradient."""
        return self.policy.detach().exp().sum(-1)


def truncated_kl(logps: TopKLogProbs, ratio: torch.Tensor, tail: str) -> torch.Tensor:
    """TIKE from the log-probs at S and at o, weighted by `ratio` (sg(r), see `importance_ratio`).

    - ``drop``: sg(r)·Σ_{v∈S} p_v ℓ_v (paper Eq. 6); gradient by autograd (Eq. 17).
    - ``sampled``: the same over S ∪ {o} (paper §4.3 guard against probability leakage).
    - ``mc``: value Σ_{v∈S} p_v ℓ_v + 1[o∉S]·sg(r)·ℓ_o, an unbiased estimate of the exact KL;
      gradient of the surrogate Σ_{v∈S} sg(p_v ℓ_v) log p_v + 1[o∉S]·sg(r ℓ_o) log p_o, whose
      expectation is the exact ∇D (differentiating the truncated sum would add ∇(top-k mass)).

    The ratio weights what depends on the sampled token: the whole sum for ``drop`` and
    ``sampled``, the tail estimate only for ``mc``. A ratio of 0 (a masked token) drops what it
    weights. Where p > 0 and q = 0 the value is +inf, and those terms contribute no gradient.
    """
    check_choice("tike_tail", tail, TAILS)
    head = logps.topk_sum()
    outside = ~logps.sampled_in_topk
    if tail == "drop":
        return _weighted(ratio, head)
    if tail == "sampled":
        sampled_term = p_log_ratio(logps.policy_sampled, logps.ref_sampled)
        return _weighted(ratio, head + torch.where(outside, sampled_term, torch.zeros_like(sampled_term)))
    # the sampled token counts only outside S, and only where p(o) > 0 (else its term is 0·ℓ = 0)
    logp_o = logps.policy_sampled
    use_o = outside & (logp_o > float("-inf"))
    tail_term = _weighted(ratio, torch.where(use_o, logp_o - logps.ref_sampled, torch.zeros_like(logp_o)))
    value = head + tail_term
    finite_logp_s = logps.policy.clamp(min=torch.finfo(logps.policy.dtype).min)
    surrogate = (_finite(p_log_ratio(logps.policy, logps.ref).detach()) * finite_logp_s).sum(-1)
    surrogate = surrogate + _finite(tail_term.detach()) * torch.where(use_o, logp_o, torch.zeros_like(logp_o))
    return value.detach() + surrogate - surrogate.detach()


def _weighted(ratio: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """ratio·value, exactly 0 where the ratio is 0 (also where the value is infinite)."""
    return torch.where(ratio == 0, torch.zeros_like(value), ratio * value)


def _finite(coefficient: torch.Tensor) -> torch.Tensor:
    """A surrogate's stop-gradient coefficient, 0 where it is infinite (q = 0: no usable gradient)."""
    return torch.where(torch.isfinite(coefficient), coefficient, torch.zeros_like(coefficient))


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The dense math runs in float32; float64 inputs stay float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def sampled_logprob(logits: torch.Tensor, sampled_ids: torch.Tensor) -> torch.Tensor:
    """log π(o) of the sampled tokens from dense logits, in at least fp32 (the oracles' log-softmax → gather)."""
    return F.log_softmax(at_least_fp32(logits), -1).gather(-1, sampled_ids.long().unsqueeze(-1)).squeeze(-1)


def kl_estimate(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    estimator: str = "tike",
    top_k: int = 16,
    tail: str = "sampled",
    importance_weight: bool = True,
    old_logprobs: torch.Tensor | None = None,
    is_clip: float | None = None,
    is_clip_mode: str = "truncate",
    bias_correction: bool = False,
) -> torch.Tensor:
    """Per-token KL(π_θ‖π_ref) estimate from full logits, shape ``policy_logits.shape[:-1]``.

    Its autograd gradient with respect to ``policy_logits`` is the gradient the estimator
    prescribes (for ``tail="mc"`` the surrogate's). Logits are unnormalised and may hold −inf; the
    math runs in float32 (float64 inputs stay float64). ``old_logprobs`` is log π_old(o_t), shaped
    like ``sampled_ids``; None means on-policy (r = 1). `is_clip` bounds r (see `importance_ratio`).
    k3 is the plain form unless ``bias_correction``, which multiplies it by TRL's differentiable
    token-level ratio (`trl_ratio`), as the trainer does with TRL's `use_bias_correction_kl`.
    """
    check_choice("kl_estimator", estimator, ESTIMATORS)
    check_choice("tike_tail", tail, TAILS)
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the "
            "same shape."
        )
    if sampled_ids.shape != policy_logits.shape[:-1]:
        raise ValueError(
            f"sampled_ids {tuple(sampled_ids.shape)} must have the logits' shape without the vocabulary dimension "
            f"{tuple(policy_logits.shape[:-1])}."
        )
    if old_logprobs is not None and old_logprobs.shape != sampled_ids.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} must be shaped like sampled_ids.")
    vocab_size = policy_logits.shape[-1]
    if sampled_ids.numel() and (sampled_ids.min() < 0 or sampled_ids.max() >= vocab_size):
        raise ValueError(f"sampled_ids must lie in [0, {vocab_size}).")
    if estimator == "tike":
        check_top_k(top_k, vocab_size)

    logp = F.log_softmax(at_least_fp32(policy_logits), dim=-1)
    logq = F.log_softmax(at_least_fp32(ref_logits), dim=-1)
    if estimator == "rb":
        return exact_kl(logp, logq)
    top = logp.detach().topk(top_k, dim=-1).indices if estimator == "tike" else sampled_ids.long().unsqueeze(-1)
    logps = TopKLogProbs.gather(logp, logq, top, sampled_ids)
    if estimator in SAMPLED_TOKEN_ESTIMATORS:
        value = sampled_token_kl(logps.policy_sampled, logps.ref_sampled, estimator)
        if estimator == "k3" and bias_correction:
            value = value * trl_ratio(logps.policy_sampled, old_logprobs)
        return value
    ratio = importance_ratio(logps.policy_sampled, old_logprobs if importance_weight else None, is_clip, is_clip_mode)
    return truncated_kl(logps, ratio, tail)


# ---- the sequence level ----

KL_GRADIENTS = ("token", "sequence")
# what the sequence-level gradient's score term subtracts from the future KL (trainer; docs/estimators.md)
SEQUENCE_BASELINES = ("loo", "running_mean", "none")
# estimators whose own local gradient has zero expectation, so the score term starts at t itself;
# that local gradient, ∇log π_θ(o_t), is itself a score term with coefficient 1, so a baseline for
# them estimates 1 + F_t
SCORE_FROM_OWN_POSITION = ("k1",)


def baseline_offset(estimator: str) -> float:
    """What a baseline of F_t adds for `estimator`: 1 for those whose own local gradient is the score
    term ∇log π_θ(o_t) with coefficient 1 (k1), so that the baseline estimates that coefficient
    plus F_t; 0 for the others."""
    return 1.0 if estimator in SCORE_FROM_OWN_POSITION else 0.0


def future_kl(values: torch.Tensor, mask: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
    """F_t = Σ_{s>t} values_s over the masked positions of each sequence ([batch, T]; from t
    itself when `inclusive`), without gradient. An infinite value (p > 0 where q = 0) adds nothing:
    as at the token level, such a term carries no gradient, and it must not turn F_t (and a
    leave-one-out baseline built from it) into inf or NaN."""
    values = torch.where(mask > 0, _finite(values.detach()), torch.zeros_like(values))
    suffix = values.flip(-1).cumsum(-1).flip(-1)
    return suffix if inclusive else suffix - values


def leave_one_out(future: torch.Tensor, group_size: int) -> torch.Tensor:
    """b_t: per position, the mean of F_t over the other sequences of each consecutive group of
    `group_size` (a baseline independent of the sequence itself, so it adds no bias)."""
    batch, length = future.shape
    if group_size < 2 or batch % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the batch ({batch}).")
    groups = future.view(batch // group_size, group_size, length)
    return ((groups.sum(1, keepdim=True) - groups) / (group_size - 1)).view(batch, length)


def score_term(logp_o: torch.Tensor, advantage: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(log π_θ(o_t) − sg(log π_θ(o_t)))·sg(weight·advantage): zero in value, its gradient the
    score-function term ∇log π_θ(o_t)·weight·advantage."""
    coefficient = advantage if weight is None else weight * advantage
    return (logp_o - logp_o.detach()) * coefficient.detach()


def sequence_kl_surrogate(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    estimator: str = "tike",
    top_k: int = 16,
    tail: str = "sampled",
    importance_weight: bool = True,
    old_logprobs: torch.Tensor | None = None,
    is_clip: float | None = None,
    is_clip_mode: str = "truncate",
    group_size: int | None = None,
    bias_correction: bool = True,
) -> torch.Tensor:
    """Per completion ([batch]), a surrogate whose detached value is the completion's sequence-KL
    estimate (Σ_t of the per-token values) and whose autograd gradient with respect to
    `policy_logits` ([batch, T, V]) is the estimator's sequence-level gradient:

        Σ_t [v_t + (log π_θ(o_t) − sg(log π_θ(o_t)))·sg(r_t·(F_t − b_t))],

    v_t the per-token estimate (`kl_estimate`, k3 with TRL's differentiable ratio unless
    `bias_correction=False`), F_t = Σ_{s>t} v_s (for k1 from t itself: its local gradient is zero in
    expectation), b_t = 0 or, with `group_size=G`, the leave-one-out mean of F_t over the other
    completions of each consecutive block of G (for k1 plus 1: its local gradient ∇log π_θ(o_t) is
    a score term with coefficient 1), and r_t = sg(π_θ(o_t)/π_old(o_t)) the token's
    importance weight (1 on-policy). `mask` ([batch, T], 1 = a completion token) defaults to all
    ones. On-policy its expected gradient is ∇KL(π_θ(y)‖π_ref(y)) for k1, k3 (with the ratio), rb
    and tike-mc (docs/estimators.md).
    """
    mask = torch.ones_like(sampled_ids, dtype=torch.float32) if mask is None else mask.to(torch.float32)
    if mask.shape != sampled_ids.shape or sampled_ids.dim() != 2:
        raise ValueError(f"sampled_ids {tuple(sampled_ids.shape)} and mask must both be [batch, T].")
    options = dict(top_k=top_k, tail=tail, importance_weight=importance_weight, is_clip=is_clip)
    values = kl_estimate(
        policy_logits,
        ref_logits,
        sampled_ids,
        estimator,
        old_logprobs=old_logprobs,
        is_clip_mode=is_clip_mode,
        bias_correction=bias_correction,
        **options,
    )
    logp_o = sampled_logprob(policy_logits, sampled_ids)
    future = future_kl(values, mask, inclusive=estimator in SCORE_FROM_OWN_POSITION)
    if group_size is not None:
        future = future - leave_one_out(future, group_size) - baseline_offset(estimator)
    ratio = importance_ratio(logp_o, old_logprobs, is_clip, is_clip_mode) if old_logprobs is not None else None
    per_token = values + score_term(logp_o, future, ratio)
    return torch.where(mask > 0, per_token, torch.zeros_like(per_token)).sum(-1)

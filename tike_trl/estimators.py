"""The per-token KL estimators of DESIGN §2, as dense tensor math.

This module is the oracle: the trainer's tiled kernels only produce log-probabilities at a few
indices (the sampled token, the policy's top-k) and hand them to the same functions used here,
and every kernel is tested against :func:`kl_estimate` on full logits.

Notation, one token position: p = π_θ(·|h), q = π_ref(·|h), ℓ_v = log p_v − log q_v, o the
sampled token (drawn from π_old), r = p(o) / π_old(o), S the top-k indices of p (chosen without
gradient), sg = stop-gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ESTIMATORS = ("k1", "k2", "k3", "rb", "tike")
SAMPLED_TOKEN_ESTIMATORS = ("k1", "k2", "k3")
TAILS = ("sampled", "drop", "mc")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the field, the value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")


def check_top_k(top_k: object, vocab_size: int | None = None) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"tike_top_k={top_k!r} must be an integer >= 1.")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"tike_top_k={top_k} is larger than the policy's vocabulary ({vocab_size} tokens).")


def p_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p·(log p − log q) elementwise, with 0·log(0/q) = 0 and a finite gradient where p = 0.

    Entries with p = 0 (a −inf logit, e.g. a masked padding row) contribute nothing; where p > 0
    and q = 0 the result is +inf, which is the honest value of the KL.
    """
    has_mass = logp > float("-inf")
    safe_logp = torch.where(has_mass, logp, torch.zeros_like(logp))
    safe_logq = torch.where(has_mass, logq, torch.zeros_like(logq))
    return torch.where(has_mass, safe_logp.exp() * (safe_logp - safe_logq), torch.zeros_like(logp))


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


CLIP_MODES = ("truncate", "mask")


def importance_ratio(
    logp_o: torch.Tensor, old_logp_o: torch.Tensor | None, clip: float | None = None, clip_mode: str = "truncate"
) -> torch.Tensor:
    """sg(r) = sg(p(o) / π_old(o)); 1 when `old_logp_o` is None (on-policy).

    `clip` bounds r from above so a stale or mismatched rollout (π_old(o) ≈ 0) cannot blow the
    loss up: ``"truncate"`` caps r at `clip`, ``"mask"`` sets r to 0 where it exceeds `clip` (that
    token's KL term is dropped), as TRL's `vllm_importance_sampling_mode` does for its ratios.
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


def truncated_kl(
    logp_s: torch.Tensor,
    logq_s: torch.Tensor,
    logp_o: torch.Tensor,
    logq_o: torch.Tensor,
    o_in_s: torch.Tensor,
    ratio: torch.Tensor,
    tail: str,
) -> torch.Tensor:
    """TIKE from log-probs at the top-k set S ([..., k]) and at the sampled token o ([...]).

    - ``drop``: sg(r)·Σ_{v∈S} p_v ℓ_v (paper Eq. 6); gradient by autograd (Eq. 17).
    - ``sampled``: the same over S ∪ {o} (paper §4.3 guard against probability leakage).
    - ``mc``: value Σ_{v∈S} p_v ℓ_v + 1[o∉S]·sg(r)·ℓ_o, an unbiased estimate of the exact KL;
      gradient of the surrogate Σ_{v∈S} sg(p_v ℓ_v) log p_v + 1[o∉S]·sg(r ℓ_o) log p_o, whose
      expectation is the exact ∇D (differentiating the truncated sum would add ∇(top-k mass)).
    """
    check_choice("tike_tail", tail, TAILS)
    head = p_log_ratio(logp_s, logq_s).sum(-1)
    outside = (~o_in_s).to(head.dtype)
    if tail == "drop":
        return ratio * head
    if tail == "sampled":
        return ratio * (head + outside * p_log_ratio(logp_o, logq_o))
    # the sampled token counts only outside S, and only where p(o) > 0 (else its term is 0·ℓ = 0)
    use_o = (~o_in_s) & (logp_o > float("-inf"))
    tail_term = ratio * torch.where(use_o, logp_o - logq_o, torch.zeros_like(logp_o))
    value = head + tail_term
    finite_logp_s = logp_s.clamp(min=torch.finfo(logp_s.dtype).min)
    surrogate = (p_log_ratio(logp_s, logq_s).detach() * finite_logp_s).sum(-1)
    surrogate = surrogate + tail_term.detach() * torch.where(use_o, logp_o, torch.zeros_like(logp_o))
    return value.detach() + surrogate - surrogate.detach()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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
) -> torch.Tensor:
    """Per-token KL(π_θ‖π_ref) estimate from full logits, shape ``policy_logits.shape[:-1]``.

    Its autograd gradient with respect to ``policy_logits`` is the gradient the estimator
    prescribes (DESIGN §2; for ``tail="mc"`` the surrogate's). Logits are unnormalised and
    may hold −inf; the math runs in float32 (float64 inputs stay float64). ``old_logprobs`` is
    log π_old(o_t), shaped like ``sampled_ids``; None means on-policy (r = 1). `is_clip` bounds r
    (see `importance_ratio`).
    k3 is the plain form, without TRL's ratio.
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

    logp = F.log_softmax(_at_least_fp32(policy_logits), dim=-1)
    logq = F.log_softmax(_at_least_fp32(ref_logits), dim=-1)
    ids = sampled_ids.long().unsqueeze(-1)
    logp_o = logp.gather(-1, ids).squeeze(-1)
    logq_o = logq.gather(-1, ids).squeeze(-1)
    if estimator in SAMPLED_TOKEN_ESTIMATORS:
        return sampled_token_kl(logp_o, logq_o, estimator)
    if estimator == "rb":
        return exact_kl(logp, logq)
    top = logp.detach().topk(top_k, dim=-1).indices
    ratio = importance_ratio(logp_o, old_logprobs if importance_weight else None, is_clip, is_clip_mode)
    return truncated_kl(logp.gather(-1, top), logq.gather(-1, top), logp_o, logq_o, (top == ids).any(-1), ratio, tail)

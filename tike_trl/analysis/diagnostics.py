"""The math of `tike-trl analyze`: how well the top-k truncation holds, and how the estimators
compare in bias and variance, from dense logits on chunks of positions.

Every KL value here comes from :mod:`tike_trl.estimators` (the oracle); this module only
arranges them: per-position coverage and truncation residual (TIKE Eq. 10-12, Tables 2 and 7),
per-sequence sums of each estimator (TIKE Figure 4, the Rao-Blackwellized paper's table), the
per-sequence KL gradients each estimator injects, and bootstrap resampling of both.

Positions are flattened: `policy_logits` and `ref_logits` are [n, V] for n scored positions,
`sampled` is [n], and `layout` ([S, L] bool) says which of S sequences of at most L tokens each
position belongs to, in row-major order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..estimators import TAILS, TopKLogProbs, at_least_fp32, kl_estimate, p_log_ratio

# value estimators compared in bias and variance; on-policy samples, so the importance ratio is 1
VALUE_ESTIMATORS = ("k1", "k3", "rb", *(f"tike-{tail}" for tail in TAILS))
# those whose expectation is the exact sequence KL (tike drop/sampled are biased by the tail)
UNBIASED_ESTIMATORS = ("k1", "k3", "rb", "tike-mc")
# the Rao-Blackwellized paper's sequence-level gradient estimators (score function over the whole
# sequence, history not fixed): Monte Carlo, and its Rao-Blackwellized form
SEQUENCE_GRADIENTS = ("mc-seq", "rb-seq")
GRADIENT_ESTIMATORS = (*VALUE_ESTIMATORS, *SEQUENCE_GRADIENTS)


@dataclass
class PositionStats:
    """Per-position truncation diagnostics; columns of the [n, K] fields follow `ks`."""

    topk_mass: torch.Tensor  # [n, K] m_k = Σ_{v∈S_k} p_v
    truncated: torch.Tensor  # [n, K] D^k = Σ_{v∈S_k} p_v ℓ_v (TIKE Eq. 10)
    tail: torch.Tensor  # [n, K] ξ_tail = Σ_{v∉S_k} p_v ℓ_v (Eq. 11), summed over the complement
    sampled_in_topk: torch.Tensor  # [n, K] o ∈ S_k
    exact: torch.Tensor  # [n] D = Σ_v p_v ℓ_v
    entropy: torch.Tensor  # [n] H(π_θ)
    top1: torch.Tensor  # [n] max_v p_v
    p_sampled: torch.Tensor  # [n] p(o)

    @staticmethod
    def cat(parts: Sequence[PositionStats]) -> PositionStats:
        return PositionStats(*(torch.cat([getattr(p, f) for p in parts]) for f in PositionStats.__dataclass_fields__))


@torch.no_grad()
def truncation_stats(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, sampled: torch.Tensor, ks: Sequence[int]
) -> PositionStats:
    """Top-k mass, truncated KL and tail residual at every k of `ks`, and the exact KL."""
    logp = F.log_softmax(at_least_fp32(policy_logits), dim=-1)
    logq = F.log_softmax(at_least_fp32(ref_logits), dim=-1)
    ids = sampled.long().unsqueeze(-1)
    logp_o = logp.gather(-1, ids).squeeze(-1)
    top = logp.topk(max(ks), dim=-1)  # sorted, so S_k is the first k columns for every k
    terms = p_log_ratio(logp, logq)
    mass, trunc, tail, inside = [], [], [], []
    for k in ks:
        s = top.indices[:, :k]
        logps = TopKLogProbs.gather(logp, logq, s, sampled)
        mass.append(logps.topk_mass())
        trunc.append(logps.topk_sum())
        tail.append(terms.scatter(-1, s, 0.0).sum(-1))
        inside.append(logps.sampled_in_topk)
    return PositionStats(
        topk_mass=torch.stack(mass, -1),
        truncated=torch.stack(trunc, -1),
        tail=torch.stack(tail, -1),
        sampled_in_topk=torch.stack(inside, -1),
        exact=terms.sum(-1),  # = exact_kl(logp, logq), reusing the terms
        entropy=-(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1),
        top1=top.values[:, 0].exp(),
        p_sampled=logp_o.exp(),
    )


def _sampled_logprob(policy_logits: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(at_least_fp32(policy_logits), dim=-1).gather(-1, sampled.long().unsqueeze(-1)).squeeze(-1)


def token_estimate(
    name: str, policy_logits: torch.Tensor, ref_logits: torch.Tensor, sampled: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Per-position value of one of VALUE_ESTIMATORS, on-policy (r = 1). Its autograd gradient is
    the one the trainer applies (history fixed); for k3 that includes TRL's default bias correction,
    k3 times the differentiable ratio π_θ(o)/π_old(o), whose value is 1 on-policy."""
    if name.startswith("tike-"):
        return kl_estimate(policy_logits, ref_logits, sampled, "tike", top_k=top_k, tail=name.removeprefix("tike-"))
    return kl_estimate(policy_logits, ref_logits, sampled, name, bias_correction=True)


def reward_to_go(values: torch.Tensor, layout: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """Per position, the sum of `values` ([n], flattened by `layout`) over the same sequence from
    this position on (`inclusive`) or after it."""
    padded = values.new_zeros(layout.shape).masked_scatter(layout, values)
    suffix = padded.flip(-1).cumsum(-1).flip(-1)
    return (suffix if inclusive else suffix - padded)[layout]


def sequence_surrogate(
    name: str,
    policy_logits: torch.Tensor,
    sampled: torch.Tensor,
    layout: torch.Tensor,
    k1: torch.Tensor,
    rb: torch.Tensor,
    rb_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position surrogate whose gradient, summed over a sequence, is one of SEQUENCE_GRADIENTS.

    With ℓ_n the log-ratio at the sampled token and D_n the exact per-token KL (`k1`, `rb`, per
    position, no gradient needed), the gradient of the sequence KL(π_θ‖π_ref) is
    E[Σ_m ∇log p(y_m)·Σ_{n≥m} ℓ_n] (`mc-seq`) = E[Σ_n ∇D_n + Σ_m ∇log p(y_m)·Σ_{n>m} D_n] (`rb-seq`):
    both are unbiased, and unlike the token-level losses they include the effect of a token on the
    KL of the positions after it. `rb_value` is D with its gradient, for `rb-seq`.
    """
    logp_o = _sampled_logprob(policy_logits, sampled)
    if name == "mc-seq":
        return logp_o * reward_to_go(k1.detach(), layout, inclusive=True)
    if name == "rb-seq":
        if rb_value is None:
            raise ValueError("rb-seq needs the exact KL with its gradient (rb_value).")
        return rb_value + logp_o * reward_to_go(rb.detach(), layout, inclusive=False)
    raise ValueError(f"Unknown sequence-level gradient estimator {name!r}; choose one of {SEQUENCE_GRADIENTS}.")


@dataclass
class ChunkScores:
    """What one chunk of whole sequences contributes to the analysis."""

    stats: PositionStats
    sequence_values: dict[str, torch.Tensor]  # name -> [S], Σ_t of the per-token estimate
    sequence_grads: dict[str, torch.Tensor] | None  # name -> [S, P], gradient of that sum


def score_chunk(
    policy_logits_fn: Callable[[torch.Tensor | None], torch.Tensor],
    norm_weight: torch.Tensor | None,
    ref_logits: torch.Tensor,
    sampled: torch.Tensor,
    layout: torch.Tensor,
    ks: Sequence[int],
    top_k: int,
) -> ChunkScores:
    """Score the positions of a chunk of whole sequences.

    `policy_logits_fn(w)` returns the policy's [n, V] logits with the parameter vector `w`
    ([n, P]: one copy per position, so that autograd yields each position's gradient separately;
    None: no gradient). With `norm_weight` ([P]) given, the per-sequence gradients of every
    GRADIENT_ESTIMATORS entry with respect to it are returned too.
    """
    seq_of_position = layout.nonzero()[:, 0]
    num_seqs = layout.shape[0]

    def per_sequence(per_position: torch.Tensor) -> torch.Tensor:
        out = per_position.new_zeros((num_seqs, *per_position.shape[1:]))
        return out.index_add_(0, seq_of_position, per_position)

    weights = None if norm_weight is None else norm_weight.detach().expand(len(sampled), -1).clone().requires_grad_()
    with torch.set_grad_enabled(weights is not None):
        policy_logits = policy_logits_fn(weights)
    stats = truncation_stats(policy_logits.detach(), ref_logits, sampled, ks)
    values, grads = {}, ({} if weights is not None else None)
    for name in VALUE_ESTIMATORS:
        with torch.set_grad_enabled(weights is not None):
            estimate = token_estimate(name, policy_logits, ref_logits, sampled, top_k)
        values[name] = estimate.detach()
        if grads is not None:
            (grad,) = torch.autograd.grad(estimate.sum(), weights, retain_graph=True)
            grads[name] = per_sequence(grad)
            if name == "rb":
                rb_value = estimate  # kept, with its graph, for rb-seq
    if grads is not None:
        for name in SEQUENCE_GRADIENTS:
            surrogate = sequence_surrogate(name, policy_logits, sampled, layout, values["k1"], values["rb"], rb_value)
            (grad,) = torch.autograd.grad(surrogate.sum(), weights, retain_graph=name != SEQUENCE_GRADIENTS[-1])
            grads[name] = per_sequence(grad)
    return ChunkScores(stats, {name: per_sequence(v) for name, v in values.items()}, grads)


# ---- summaries ----


def bootstrap_means(samples: torch.Tensor, batch: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """Means of `draws` batches of `batch` rows drawn with replacement from `samples` ([N, ...])."""
    idx = torch.randint(0, samples.shape[0], (draws, batch), generator=generator)
    return samples[idx].mean(dim=1)


def bias_variance(
    values: dict[str, torch.Tensor], sizes: Sequence[int], draws: int, generator: torch.Generator
) -> dict:
    """Bootstrap mean and std of each estimator's sequence-level KL estimate from M samples, for M
    in `sizes`; the ground truth is the exact (rb) estimate averaged over the whole pool."""
    out = {"truth": values["rb"].double().mean().item(), "estimators": {}}
    for name, v in values.items():
        boots = [bootstrap_means(v.double(), m, draws, generator) for m in sizes]
        out["estimators"][name] = {"mean": [b.mean().item() for b in boots], "std": [b.std().item() for b in boots]}
    return out


def gradient_spread(grads: dict[str, torch.Tensor], batch: int, draws: int, generator: torch.Generator) -> dict:
    """For each estimator, over `draws` resampled batches of `batch` sequences: the mean and variance
    of the batch gradient's norm (the Rao-Blackwellized paper's measure), the total variance
    E‖ḡ − E ḡ‖², and the cosine between the pool-mean gradient and its exact counterpart's (rb for
    the token-level estimators, rb-seq for the sequence-level ones)."""
    means = {name: g.double().mean(0) for name, g in grads.items()}
    out = {}
    for name, g in grads.items():
        batches = bootstrap_means(g.double(), batch, draws, generator)
        norms = batches.norm(dim=-1)
        exact = means["rb-seq" if name in SEQUENCE_GRADIENTS else "rb"]
        out[name] = {
            "norm_mean": norms.mean().item(),
            "norm_var": norms.var().item(),
            "total_var": (batches - batches.mean(0)).pow(2).sum(-1).mean().item(),
            "cos_to_exact": F.cosine_similarity(means[name], exact, dim=0).item(),
        }
    return out


def _mean(values: torch.Tensor, selected: torch.Tensor) -> float | None:
    """Mean over the selected positions; None (null in JSON) when there are none."""
    return values[selected].mean().item() if bool(selected.any()) else None


def coverage_table(stats: PositionStats, ks: Sequence[int], high: float = 0.99, low: float = 0.90) -> dict:
    """Per k, the TIKE Table 2 / Table 7 statistics over all positions and in the regimes m_k >= high
    and m_k < low: fraction of positions, mean m_k, mean entropy, mean and p95 |ξ_tail|, and how
    often the sampled token lies in S_k."""
    table = {}
    for col, k in enumerate(ks):
        mass, abs_tail = stats.topk_mass[:, col], stats.tail[:, col].abs()
        regimes = {"all": torch.ones_like(mass, dtype=torch.bool), f"m>={high}": mass >= high, f"m<{low}": mass < low}
        table[k] = {}
        for regime, sel in regimes.items():
            n = int(sel.sum())
            table[k][regime] = {
                "positions": n,
                "fraction": n / max(len(mass), 1),
                "mean_mass": _mean(mass, sel),
                "mean_entropy": _mean(stats.entropy, sel),
                "mean_abs_tail": _mean(abs_tail, sel),
                "p95_abs_tail": abs_tail[sel].quantile(0.95).item() if n else None,
                "sampled_in_topk": _mean(stats.sampled_in_topk[:, col].float(), sel),
            }
    return table


def identity_error(stats: PositionStats) -> float:
    """max |D − (D^k + ξ_tail)| over positions and k: TIKE Eq. 12, each side summed separately."""
    return (stats.exact.unsqueeze(-1) - (stats.truncated + stats.tail)).abs().max().item()

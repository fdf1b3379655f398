"""The math of `tike-trl analyze`: how well the top-k truncation holds, and how the estimators
compare in bias and variance, from dense logits on chunks of positions.

Every KL value here comes from :mod:`tike_trl.estimators` (the oracle), and so do the pieces of the
sequence-level gradient (`future_kl`, `leave_one_out`, the score term); this module only arranges
them: per-position coverage and truncation residual (TIKE Eq. 10-12, Tables 2 and 7), per-sequence
sums of each estimator (TIKE Figure 4, the Rao-Blackwellized paper's table), the per-sequence KL
gradients each estimator injects at the token and at the sequence level, and bootstrap resampling
of both.

Positions are flattened: `policy_logits` and `ref_logits` are [n, V] for n scored positions,
`sampled` is [n], and `layout` ([S, L] bool) says which of S sequences of at most L tokens each
position belongs to, in row-major order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..estimators import (
    SCORE_FROM_OWN_POSITION,
    TAILS,
    TopKLogProbs,
    at_least_fp32,
    baseline_offset,
    future_kl,
    kl_estimate,
    leave_one_out,
    p_log_ratio,
    sampled_logprob,
)

# value estimators compared in bias and variance; on-policy samples, so the importance ratio is 1
VALUE_ESTIMATORS = ("k1", "k3", "rb", *(f"tike-{tail}" for tail in TAILS))
# those whose expectation is the exact sequence KL (tike drop/sampled are biased by the tail); the
# same four have a sequence-level gradient whose expectation is ∇KL(π_θ(y)‖π_ref(y))
UNBIASED_ESTIMATORS = ("k1", "k3", "rb", "tike-mc")
# the gradient of each value estimator: token level (history fixed, what a token-level KL loss
# applies), and sequence level (`kl_gradient="sequence"`: each position's score term carries the
# future KL F_t) without a baseline, with the leave-one-out baseline over the other sequences of
# the batch (`loo`), and with the pool's mean F_t per position (`mean`, the running mean's limit)
GRADIENT_KINDS = ("token", "seq", "seq-loo", "seq-mean")
# the score-function part of k1-seq alone, Σ_t ∇log π(o_t)·Σ_{s≥t} k1_s (k1-seq = mc-seq + Σ_t ∇log π(o_t))
MC_SEQUENCE = "mc-seq"


def gradient_name(estimator: str, kind: str) -> str:
    """The row name of `estimator`'s gradient of one of GRADIENT_KINDS: "rb", "rb-seq", "rb-seq-loo", ..."""
    return estimator if kind == "token" else f"{estimator}-{kind}"


GRADIENT_ESTIMATORS = (*(gradient_name(e, kind) for e in VALUE_ESTIMATORS for kind in GRADIENT_KINDS), MC_SEQUENCE)


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


def token_estimate(
    name: str, policy_logits: torch.Tensor, ref_logits: torch.Tensor, sampled: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Per-position value of one of VALUE_ESTIMATORS, on-policy (r = 1). Its autograd gradient is
    the one the trainer applies (history fixed); for k3 that includes TRL's default bias correction,
    k3 times the differentiable ratio π_θ(o)/π_old(o), whose value is 1 on-policy."""
    if name.startswith("tike-"):
        return kl_estimate(policy_logits, ref_logits, sampled, "tike", top_k=top_k, tail=name.removeprefix("tike-"))
    return kl_estimate(policy_logits, ref_logits, sampled, name, bias_correction=True)


def _estimator(name: str) -> str:
    """The estimators-module name of one of VALUE_ESTIMATORS ("tike-mc" -> "tike")."""
    return name.split("-")[0]


@dataclass
class GradientParts:
    """Per sequence, the pieces every row of the gradient section is assembled from, with respect
    to a parameter vector of P entries; S sequences, padded to L positions (0 at padding)."""

    token: dict[str, torch.Tensor]  # VALUE_ESTIMATORS name -> [S, P], Σ_t ∇v_t: the token-level gradient
    score: torch.Tensor  # [S, L, P], C_t = ∇log π_θ(o_t) at each position
    future: dict[str, torch.Tensor]  # VALUE_ESTIMATORS name -> [S, L], F_t = Σ_{s>t} v_s (k1: s ≥ t)

    @staticmethod
    def cat(parts: Sequence[GradientParts]) -> GradientParts:
        return GradientParts(
            {name: torch.cat([p.token[name] for p in parts]) for name in parts[0].token},
            torch.cat([p.score for p in parts]),
            {name: torch.cat([p.future[name] for p in parts]) for name in parts[0].future},
        )


def score_gradient(score: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """Σ_t C_t·coefficient_t per sequence ([..., L, P], [..., L] -> [..., P], float64): the gradient
    of Σ_t `score_term`(log π(o_t), coefficient_t). Composed from the score gradients C_t, one
    backward serves every estimator and baseline, instead of one backward each."""
    return torch.einsum("...lp,...l->...p", score.double(), coefficient.double())


def sequence_gradient(parts: GradientParts, name: str, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence ([S, P], float64), the sequence-level gradient of the value estimator `name`,
    Σ_t [∇v_t + ∇log π(o_t)·(F_t − b_t)], the autograd gradient of `sequence_kl_surrogate`;
    `baseline` is b ([L] or [S, L]; None: 0)."""
    advantage = parts.future[name] if baseline is None else parts.future[name] - baseline
    return parts.token[name].double() + score_gradient(parts.score, advantage)


def per_sequence_gradients(parts: GradientParts) -> dict[str, torch.Tensor]:
    """Every GRADIENT_ESTIMATORS row that is a per-sequence gradient ([S, P], float64): all but the
    leave-one-out rows, which depend on the batch (`loo_batch_gradients`). The "seq-mean" baseline
    is the mean of F_t over the S sequences, per position."""
    out = {}
    for name in VALUE_ESTIMATORS:
        out[name] = parts.token[name].double()
        out[gradient_name(name, "seq")] = sequence_gradient(parts, name)
        mean = parts.future[name].mean(0) + baseline_offset(_estimator(name))
        out[gradient_name(name, "seq-mean")] = sequence_gradient(parts, name, mean)
    out[MC_SEQUENCE] = score_gradient(parts.score, parts.future["k1"])
    return out


def loo_batch_gradients(
    parts: GradientParts, idx: torch.Tensor, max_elements: int = 1 << 22
) -> dict[str, torch.Tensor]:
    """For each batch of sequences `idx` ([draws, B], rows of `parts`, repeats allowed), the batch-mean
    sequence-level gradient with the leave-one-out baseline ([draws, P] per estimator, named
    "<est>-seq-loo"): (1/B) Σ_i [A_i − Σ_t C_{i,t}·b_t^(i)], A_i the gradient without a baseline and
    b^(i) the mean F_t of the other B − 1 members (`leave_one_out`). Batches go `max_elements`
    gathered score entries at a time."""
    draws, batch = idx.shape
    _, length, params = parts.score.shape
    no_baseline = {name: sequence_gradient(parts, name) for name in VALUE_ESTIMATORS}
    out = {name: [] for name in VALUE_ESTIMATORS}
    step = max(1, max_elements // (batch * length * params))
    for rows in idx.split(step):
        score = parts.score[rows]  # [c, B, L, P]
        for name in VALUE_ESTIMATORS:
            baseline = leave_one_out(parts.future[name][rows].reshape(-1, length), batch).view(*rows.shape, length)
            baseline = baseline + baseline_offset(_estimator(name))
            out[name].append(no_baseline[name][rows].mean(1) - score_gradient(score, baseline).mean(1))
    return {gradient_name(name, "seq-loo"): torch.cat(g) for name, g in out.items()}


@dataclass
class ChunkScores:
    """What one chunk of whole sequences contributes to the analysis."""

    stats: PositionStats
    sequence_values: dict[str, torch.Tensor]  # name -> [S], Σ_t of the per-token estimate
    gradients: GradientParts | None  # the pieces of every gradient row, per sequence


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
    None: no gradient). With `norm_weight` ([P]) given, the per-sequence gradient pieces with respect
    to it are returned too (`GradientParts`): one backward per value estimator and one for the
    score gradients ∇log π(o_t), from which every sequence-level row is composed.
    """
    seq_of_position = layout.nonzero()[:, 0]
    num_seqs = layout.shape[0]

    def per_sequence(per_position: torch.Tensor) -> torch.Tensor:
        out = per_position.new_zeros((num_seqs, *per_position.shape[1:]))
        return out.index_add_(0, seq_of_position, per_position)

    def padded(per_position: torch.Tensor) -> torch.Tensor:
        out = per_position.new_zeros((*layout.shape, *per_position.shape[1:]))
        out[layout] = per_position
        return out

    weights = None if norm_weight is None else norm_weight.detach().expand(len(sampled), -1).clone().requires_grad_()
    with torch.set_grad_enabled(weights is not None):
        policy_logits = policy_logits_fn(weights)
    stats = truncation_stats(policy_logits.detach(), ref_logits, sampled, ks)
    values, token_grads = {}, {}
    for name in VALUE_ESTIMATORS:
        with torch.set_grad_enabled(weights is not None):
            estimate = token_estimate(name, policy_logits, ref_logits, sampled, top_k)
        values[name] = estimate.detach()
        if weights is not None:
            (grad,) = torch.autograd.grad(estimate.sum(), weights, retain_graph=True)
            token_grads[name] = per_sequence(grad)
    gradients = None
    if weights is not None:
        with torch.enable_grad():
            (score,) = torch.autograd.grad(sampled_logprob(policy_logits, sampled).sum(), weights)
        mask = layout.to(torch.float32)
        future = {
            name: future_kl(padded(values[name]), mask, inclusive=_estimator(name) in SCORE_FROM_OWN_POSITION)
            for name in VALUE_ESTIMATORS
        }
        gradients = GradientParts(token_grads, padded(score), future)
    return ChunkScores(stats, {name: per_sequence(v) for name, v in values.items()}, gradients)


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


def gradient_spread(parts: GradientParts, batch: int, draws: int, generator: torch.Generator) -> dict:
    """For each GRADIENT_ESTIMATORS row, over `draws` batches of `batch` sequences drawn with
    replacement (the same batches for every row): the mean and variance of the batch gradient's norm
    (the Rao-Blackwellized paper's measure), the total variance E‖ḡ − E ḡ‖², and the cosine between
    the expected batch gradient and the exact one's: rb's pool mean for the token-level rows (history
    fixed), rb-seq's for the sequence-level ones; and, for every row, the cosine with rb-seq's (the
    gradient of the sequence KL itself). The expected leave-one-out gradient under this resampling is
    that of the pool-mean baseline (the other members are independent of the sequence), so it is used."""
    idx = torch.randint(0, len(parts.score), (draws, batch), generator=generator)
    rows = per_sequence_gradients(parts)
    expected = {name: g.mean(0) for name, g in rows.items()}
    batches = loo_batch_gradients(parts, idx)
    for name in VALUE_ESTIMATORS:
        expected[gradient_name(name, "seq-loo")] = expected[gradient_name(name, "seq-mean")]
    out = {}
    for name in GRADIENT_ESTIMATORS:
        means = batches[name] if name in batches else rows[name][idx].mean(1)
        norms = means.norm(dim=-1)
        exact = expected["rb-seq" if "-seq" in name else "rb"]
        out[name] = {
            "norm_mean": norms.mean().item(),
            "norm_var": norms.var().item(),
            "total_var": (means - means.mean(0)).pow(2).sum(-1).mean().item(),
            "cos_to_exact": F.cosine_similarity(expected[name], exact, dim=0).item(),
            "cos_to_sequence": F.cosine_similarity(expected[name], expected["rb-seq"], dim=0).item(),
        }
    return out


def baseline_effects(summary: dict, per_prompt: Sequence[dict] = ()) -> dict:
    """Per value estimator, from a `gradient_spread` averaged over prompts (`summary`): the total
    variance and norm variance of its sequence-level rows with a baseline relative to no baseline,
    the kind with the lowest total variance, and on how many of the `per_prompt` spreads each
    baseline has the lower total variance."""
    out = {}
    for name in VALUE_ESTIMATORS:
        base = summary[gradient_name(name, "seq")]
        relative, wins = {}, {}
        for kind in ("seq-loo", "seq-mean"):
            row = summary[gradient_name(name, kind)]
            relative[kind] = {
                metric: row[metric] / base[metric] if base[metric] else float("nan")
                for metric in ("total_var", "norm_var")
            }
            wins[kind] = sum(
                p[gradient_name(name, kind)]["total_var"] < p[gradient_name(name, "seq")]["total_var"]
                for p in per_prompt
            )
        kinds = ("seq", "seq-loo", "seq-mean")
        lowest = min(kinds, key=lambda kind: summary[gradient_name(name, kind)]["total_var"])
        out[name] = {"relative": relative, "lowest_total_var": lowest, "wins": wins}
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

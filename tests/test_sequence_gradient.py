"""`sequence_kl_surrogate` against the exact gradient of the sequence KL, by enumeration on the tabular
model (`tests/tabular.py`: V = 5, T = 3, all 125 sequences, fp64; pairs: all 125² ordered pairs).

Expectations are probability-weighted sums with the weights held constant, so E[∇surrogate] is
one autograd call. docs/estimators.md, "The sequence-level gradient", derives each line:

- on-policy, k1, k3 with TRL's ratio, rb and tike-mc: E[value] = KL(π_θ(y)‖π_ref(y)) and
  E[∇surrogate] = ∇KL, without a baseline, with the leave-one-out baseline over pairs and with a
  per-position constant baseline (the running mean's limit E[F_t]); also with EOS-ended completions
  under a sum aggregation;
- plain k3: ∇KL + E[Σ_t ∇KL(π_ref‖π_θ)_t − ∇D_t] (history fixed);
- tike-drop: ∇ of the truncated objective E[Σ_t T_t]; tike-sampled: neither ∇KL nor ∇ of its own mean;
- a length-normalised aggregation (grpo): E[ĝ/|y|] = ∇E[KL̂/|y|] − E[Σ_t ∇log π(o_t)·Σ_{s≤t} D_s/|y|];
- off-policy: prefix ratios make it exact again; the per-token ratio alone does not;
- a token with q = 0 (KL +inf) keeps its completion's value +inf and every gradient finite.
"""

import pytest
import torch
import torch.nn.functional as F
from tabular import (
    SEQUENCES,
    batch_logits,
    eos_mask,
    probabilities,
    sequence_kl,
    tables,
    token_logprobs,
)

from tike_trl.estimators import future_kl, kl_estimate, score_term
from tike_trl.estimators import sequence_kl_surrogate as surrogate

TOL = dict(atol=1e-12, rtol=1e-10)
EXACT = {
    "k1": dict(estimator="k1"),
    "k3": dict(estimator="k3"),  # with TRL's ratio (bias_correction=True, the default)
    "rb": dict(estimator="rb"),
    "tike-mc": dict(estimator="tike", top_k=2, tail="mc"),
}
N = SEQUENCES.shape[0]


def _grad(objective, theta):
    return torch.autograd.grad(objective, theta, retain_graph=True)[0]


def _surrogates(theta, ref, seqs=SEQUENCES, **kwargs):
    """Per sequence, the surrogate (its logits are built from the tables, so autograd reaches θ)."""
    return surrogate(batch_logits(theta, seqs), batch_logits(ref, seqs), seqs, **kwargs)


def _values(theta, ref, bias_correction=True, **kwargs):
    """[N, T]: the per-token values v_t the surrogate sums (k3 with TRL's ratio, as the surrogate's default)."""
    return kl_estimate(batch_logits(theta), batch_logits(ref), SEQUENCES, bias_correction=bias_correction, **kwargs)


def _future(theta, ref, kwargs):
    """F_t along every sequence, as the surrogate forms it (k1 from t itself)."""
    values = _values(theta, ref, **kwargs).detach()
    return future_kl(values, torch.ones_like(values), inclusive=kwargs["estimator"] == "k1")


@pytest.mark.parametrize("name", EXACT)
def test_on_policy_exact_without_baseline(name):
    theta, ref = tables()
    weights = probabilities(theta)
    values = _surrogates(theta, ref, **EXACT[name])
    torch.testing.assert_close((weights * values.detach()).sum(), sequence_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad((weights * values).sum(), theta), _grad(sequence_kl(theta, ref), theta), **TOL)


@pytest.mark.parametrize("name", EXACT)
def test_on_policy_exact_with_leave_one_out_over_all_ordered_pairs(name):
    """group_size=2: each completion's baseline is the other's F_t; the pair's mean over every
    ordered pair (i, j), weighted by π(i)π(j), is the sequence KL and its gradient."""
    theta, ref = tables()
    weights = probabilities(theta)
    first, second = torch.arange(N).repeat_interleave(N), torch.arange(N).repeat(N)
    pairs = torch.stack([first, second], 1).view(-1)  # [i0, j0, i1, j1, ...]: consecutive blocks of 2
    pair_weights = (weights[first] * weights[second]).repeat_interleave(2) / 2
    values = _surrogates(theta, ref, SEQUENCES[pairs], group_size=2, **EXACT[name])
    torch.testing.assert_close((pair_weights * values.detach()).sum(), sequence_kl(theta, ref), **TOL)
    exact = _grad(sequence_kl(theta, ref), theta)
    torch.testing.assert_close(_grad((pair_weights * values).sum(), theta), exact, **TOL)


@pytest.mark.parametrize("name", EXACT)
def test_on_policy_exact_with_a_constant_per_position_baseline(name):
    """The running mean's limit, b_t = E[F_t] (any constant would do): subtracting it adds no bias."""
    theta, ref = tables()
    weights = probabilities(theta)
    baseline = (weights[:, None] * _future(theta, ref, EXACT[name])).sum(0)
    assert baseline[:2].abs().min() > 1e-3  # a real baseline wherever a future exists
    logp_o = token_logprobs(theta)
    values = _surrogates(theta, ref, **EXACT[name]) - score_term(logp_o, baseline.expand_as(logp_o)).sum(-1)
    torch.testing.assert_close((weights * values.detach()).sum(), sequence_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad((weights * values).sum(), theta), _grad(sequence_kl(theta, ref), theta), **TOL)


@pytest.mark.parametrize("name", EXACT)
def test_on_policy_exact_with_eos_ended_completions_under_a_sum_aggregation(name):
    """Token 0 ends a completion (EOS included, later positions masked): Σ_t over the mask (dr_grpo,
    luspo) is still exact, for the KL of the ended sequences."""
    theta, ref = tables()
    mask = eos_mask()
    assert 0 < mask.sum(-1).min() < mask.sum(-1).max()
    weights = probabilities(theta)
    values = _surrogates(theta, ref, mask=mask, **EXACT[name])
    exact = sequence_kl(theta, ref, mask)
    torch.testing.assert_close((weights * values.detach()).sum(), exact, **TOL)
    torch.testing.assert_close(_grad((weights * values).sum(), theta), _grad(exact, theta), **TOL)


def _per_token_kls(theta, ref):
    """[N, T]: KL(π_θ‖π_ref) and KL(π_ref‖π_θ) at each history, differentiable in θ."""
    logp, logq = F.log_softmax(batch_logits(theta), -1), F.log_softmax(batch_logits(ref), -1)
    return (logp.exp() * (logp - logq)).sum(-1), (logq.exp() * (logq - logp)).sum(-1)


def test_plain_k3_gradient_is_off_by_the_reverse_kl_gradient_at_each_history():
    """Without TRL's ratio, k3's local gradient has expectation ∇KL(π_ref‖π_θ)_t, not ∇D_t; its
    value (and so F_t) is still unbiased. E[∇surrogate] = ∇KL + E[Σ_t ∇(KL(π_ref‖π_θ)_t − D_t)]."""
    theta, ref = tables()
    weights = probabilities(theta)
    values = _surrogates(theta, ref, estimator="k3", bias_correction=False)
    torch.testing.assert_close((weights * values.detach()).sum(), sequence_kl(theta, ref), **TOL)
    forward, reverse = _per_token_kls(theta, ref)
    bias = _grad((weights * (reverse - forward).sum(-1)).sum(), theta)
    exact = _grad(sequence_kl(theta, ref), theta)
    torch.testing.assert_close(_grad((weights * values).sum(), theta), exact + bias, **TOL)
    assert bias.norm() > 0.1 * exact.norm()


def _truncated_objective(theta, ref, top_k):
    """E_y[Σ_t T_t(h_t)], T_t = Σ_{v∈S_t} p_v ℓ_v, S_t the top-k of p (chosen without gradient), with
    the sequence probabilities differentiable: the objective tike-drop's sequence gradient follows."""
    logp, logq = F.log_softmax(batch_logits(theta), -1), F.log_softmax(batch_logits(ref), -1)
    top = logp.detach().topk(top_k, -1).indices
    truncated = (logp.exp() * (logp - logq)).gather(-1, top).sum(-1)
    return (token_logprobs(theta).sum(-1).exp() * truncated.sum(-1)).sum()


def test_tike_drop_follows_the_truncated_sequence_objective_exactly():
    theta, ref = tables()
    weights = probabilities(theta)
    values = _surrogates(theta, ref, estimator="tike", top_k=2, tail="drop")
    objective = _truncated_objective(theta, ref, top_k=2)
    torch.testing.assert_close((weights * values.detach()).sum(), objective, **TOL)
    torch.testing.assert_close(_grad((weights * values).sum(), theta), _grad(objective, theta), **TOL)
    exact = _grad(sequence_kl(theta, ref), theta)
    assert (_grad(objective, theta) - exact).norm() > 0.1 * exact.norm()  # the tails matter on this table


def test_tike_sampled_is_biased_and_misses_its_own_score_at_t():
    """tike-sampled's value depends on o_t (the sampled token's term), and neither its local gradient
    nor F_t (from s > t) carries ∇log π(o_t)·v_t: E[∇surrogate] = ∇E[Σ_t v_t] − E[Σ_t ∇log π(o_t)·v_t]."""
    theta, ref = tables()
    weights = probabilities(theta)
    kwargs = dict(estimator="tike", top_k=2, tail="sampled")
    values = _surrogates(theta, ref, **kwargs)
    per_token = _values(theta, ref, **kwargs)
    own_mean = (token_logprobs(theta).sum(-1).exp() * per_token.detach().sum(-1)).sum()
    own_score = (weights[:, None] * token_logprobs(theta) * per_token.detach()).sum()
    expected = _grad((weights * values).sum(), theta)
    own_grad = _grad(own_mean, theta) + _grad((weights * per_token.sum(-1)).sum(), theta)
    torch.testing.assert_close(expected, own_grad - _grad(own_score, theta), **TOL)
    exact = _grad(sequence_kl(theta, ref), theta)
    assert (expected - exact).norm() > 0.05 * exact.norm()


def test_a_length_normalised_aggregation_drops_the_normalisers_score_terms():
    """grpo/sapo divide each completion by its length |y|, which depends on the sampled tokens
    (here: where EOS falls). What the surrogate then follows is E[ĝ(y)/|y|] = ∇E[Σ_t D_t/|y|] −
    E[Σ_t ∇log π(o_t)·Σ_{s≤t} D_s/|y|] (rb), neither ∇KL/E|y| nor ∇E[KL̂/|y|]."""
    theta, ref = tables()
    mask = eos_mask()
    length = mask.sum(-1)
    weights = probabilities(theta)
    expected = _grad((weights * _surrogates(theta, ref, mask=mask, estimator="rb") / length).sum(), theta)
    forward, _ = _per_token_kls(theta, ref)
    normalised = (token_logprobs(theta).sum(-1).exp() * (forward * mask).sum(-1) / length).sum()
    past = (forward * mask).detach().cumsum(-1)  # Σ_{s≤t} D_s
    missing = (weights[:, None] * token_logprobs(theta) * mask * past / length[:, None]).sum()
    torch.testing.assert_close(expected, _grad(normalised, theta) - _grad(missing, theta), **TOL)
    assert _grad(missing, theta).norm() > 0.05 * expected.norm()
    per_length = _grad(sequence_kl(theta, ref, mask), theta) / (weights * length).sum()
    assert (expected - per_length).norm() > 0.05 * expected.norm()


def _off_policy(theta, delta, seed=7):
    g = torch.Generator().manual_seed(seed)
    return theta.detach() + delta * torch.randn(theta.shape, generator=g, dtype=theta.dtype)


@pytest.mark.parametrize("name", ["rb", "tike-mc"])
def test_off_policy_prefix_ratios_are_exact_and_the_token_ratio_is_not(name):
    """Sequences from π_old, old_logprobs = log π_old. Weighting position s's KL term (its value,
    its local gradient and its share of every earlier score term) by ρ_{s−1} = Π_{u<s} r_u is
    exact; the surrogate's per-token sg(r_t) alone is not (first order in π_θ − π_old)."""
    theta, ref = tables()
    old = _off_policy(theta, 0.5)
    weights = probabilities(old)
    old_logprobs = token_logprobs(old)
    kwargs = dict(EXACT[name], old_logprobs=old_logprobs)
    exact_value, exact = sequence_kl(theta, ref), _grad(sequence_kl(theta, ref), theta)

    token_ratio = _surrogates(theta, ref, **kwargs)
    bias = _grad((weights * token_ratio).sum(), theta) - exact
    assert bias.norm() > 0.01 * exact.norm()

    logp_o = token_logprobs(theta)
    per_token = _values(theta, ref, **kwargs)
    log_ratio = (logp_o - old_logprobs).detach()
    prefix = (log_ratio.cumsum(-1) - log_ratio).exp()  # ρ_{t−1}
    future = future_kl(prefix * per_token.detach(), torch.ones_like(prefix))  # Σ_{s>t} ρ_{s−1} v_s
    weighted = (prefix * per_token).sum(-1) + score_term(logp_o, future).sum(-1)
    torch.testing.assert_close((weights * weighted.detach()).sum(), exact_value, **TOL)
    torch.testing.assert_close(_grad((weights * weighted).sum(), theta), exact, **TOL)


@pytest.mark.parametrize("kwargs", [dict(estimator="rb"), dict(estimator="tike", top_k=2, tail="mc")], ids=str)
def test_an_infinite_token_kl_stays_in_its_completion(kwargs):
    """Where q = 0 and p > 0 the token's KL is +inf and carries no gradient (as `kl_estimate`'s); it
    must not make F_t, the completion's surrogate or its group partner's baseline inf or NaN: the
    completion's value is +inf, every gradient finite, and the partner's gradient is the one it gets
    when that token is masked out of F (the only place it reaches the partner)."""
    g = torch.Generator().manual_seed(3)
    policy = torch.randn(4, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 6, (4, 3), generator=g)
    ref[0, 2, ids[0, 2]] = float("-inf")  # q = 0 at a sampled token
    values = surrogate(policy, ref, ids, group_size=2, **kwargs)
    (grad,) = torch.autograd.grad(values.sum(), policy)
    assert values[0] == float("inf") and torch.isfinite(values[1:]).all() and torch.isfinite(grad).all()
    mask = torch.ones(4, 3)
    mask[0, 2] = 0
    partner = surrogate(policy, ref, ids, mask, group_size=2, **kwargs)[1]
    torch.testing.assert_close(grad[1], torch.autograd.grad(partner, policy)[0][1], **TOL)

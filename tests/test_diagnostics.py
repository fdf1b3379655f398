"""The math of `tike-trl analyze` (tike_trl/analysis/diagnostics.py) on random logits and by exact
enumeration: truncation identities, per-sequence gradients, the sequence-level gradient
estimators, and what "rb has the smallest variance" does and does not guarantee."""

import itertools
import math

import pytest
import torch
from tabular import T, V, exact_sequence_kl, histories, seq_logprob, tables

from tike_trl import kl_estimate
from tike_trl.analysis import diagnostics


def _random_logits(n=64, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(n, vocab, generator=g) * 3
    ref = policy + torch.randn(n, vocab, generator=g)
    sampled = torch.multinomial(policy.softmax(-1), 1, generator=g).squeeze(1)
    return policy, ref, sampled


def test_truncation_stats_identities():
    policy, ref, sampled = _random_logits()
    ks = (1, 4, 16, 50)
    stats = diagnostics.truncation_stats(policy, ref, sampled, ks)
    # m_k grows with k, position by position, and the whole vocabulary holds all the mass and KL
    assert (stats.topk_mass.diff(dim=-1) >= -1e-6).all()
    torch.testing.assert_close(stats.topk_mass[:, -1], torch.ones(len(sampled)))
    torch.testing.assert_close(stats.tail[:, -1], torch.zeros(len(sampled)), atol=1e-6, rtol=0)
    # Eq. 12, each side summed separately; the truncated sum is the oracle's tike without a tail
    assert diagnostics.identity_error(stats) < 1e-5
    torch.testing.assert_close(stats.truncated[:, 1], kl_estimate(policy, ref, sampled, "tike", top_k=4, tail="drop"))
    torch.testing.assert_close(stats.exact, kl_estimate(policy, ref, sampled, "rb"))
    assert stats.tail[:, 1].abs().max() > 1e-2  # k=4 of 50 leaves a real tail
    logp = policy.log_softmax(-1)
    torch.testing.assert_close(stats.entropy, -(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(stats.p_sampled, logp.exp().gather(-1, sampled[:, None]).squeeze(-1))


def test_coverage_table_regimes():
    policy, ref, sampled = _random_logits(n=200)
    stats = diagnostics.truncation_stats(policy, ref, sampled, (4, 16))
    table = diagnostics.coverage_table(stats, (4, 16))
    for col, k in enumerate((4, 16)):
        mass = stats.topk_mass[:, col]
        assert table[k]["all"]["mean_mass"] == pytest.approx(mass.mean().item())
        assert table[k]["m>=0.99"]["positions"] == int((mass >= 0.99).sum())
        low = mass < 0.9
        assert table[k]["m<0.9"]["mean_abs_tail"] == pytest.approx(stats.tail[low, col].abs().mean().item())
    assert table[16]["all"]["mean_mass"] >= table[4]["all"]["mean_mass"]


def test_reward_to_go():
    layout = torch.tensor([[True, True, True], [True, False, False]])
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    torch.testing.assert_close(
        diagnostics.reward_to_go(values, layout, inclusive=True), torch.tensor([6.0, 5.0, 3.0, 10.0])
    )
    torch.testing.assert_close(
        diagnostics.reward_to_go(values, layout, inclusive=False), torch.tensor([5.0, 3.0, 0.0, 0.0])
    )


def test_score_chunk_per_sequence_gradients():
    """Each sequence's gradient is the gradient of that sequence's loss alone, for a parameter
    shared by every position (here: a scale on the hidden states, as the final norm's weight)."""
    g = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(7, 6, generator=g), torch.randn(30, 6, generator=g)
    weight = torch.rand(6, generator=g) + 0.5
    ref_logits = hidden @ head.T + torch.randn(7, 30, generator=g)
    layout = torch.tensor([[True, True, True, True], [True, True, True, False]])
    sampled = torch.randint(0, 30, (7,), generator=g)

    def logits_fn(w, rows=slice(None)):
        return (hidden[rows] * (weight if w is None else w)) @ head.T

    scores = diagnostics.score_chunk(logits_fn, weight, ref_logits, sampled, layout, (2, 8), top_k=2)
    assert set(scores.sequence_grads) == set(diagnostics.GRADIENT_ESTIMATORS)
    for s, rows in enumerate((slice(0, 4), slice(4, 7))):
        w = weight.clone().requires_grad_()
        logits = logits_fn(w, rows)
        for name in ("k1", "rb", "tike-mc"):
            value = diagnostics.token_estimate(name, logits, ref_logits[rows], sampled[rows], 2)
            torch.testing.assert_close(scores.sequence_values[name][s], value.sum().detach())
            torch.testing.assert_close(
                scores.sequence_grads[name][s], torch.autograd.grad(value.sum(), w, retain_graph=True)[0]
            )
        one = layout[s : s + 1]
        k1 = kl_estimate(logits, ref_logits[rows], sampled[rows], "k1").detach()
        rb = kl_estimate(logits, ref_logits[rows], sampled[rows], "rb")
        surrogate = diagnostics.sequence_surrogate("rb-seq", logits, sampled[rows], one, k1, rb.detach(), rb)
        torch.testing.assert_close(scores.sequence_grads["rb-seq"][s], torch.autograd.grad(surrogate.sum(), w)[0])


def _all_sequences(theta, ref):
    """(ids, probability, policy logits, reference logits) of every sequence of the tabular model."""
    for seq in itertools.product(range(V), repeat=T):
        rows = histories(seq)
        yield (
            torch.tensor(seq),
            seq_logprob(theta, seq).exp(),
            torch.stack([theta[t, h] for t, h in enumerate(rows)]),
            torch.stack([ref[t, h] for t, h in enumerate(rows)]),
        )


@pytest.mark.parametrize("name", diagnostics.SEQUENCE_GRADIENTS)
def test_sequence_gradients_are_unbiased(name):
    """mc-seq and rb-seq: expected gradient = ∇ of the exact sequence KL (125 sequences enumerated)."""
    theta, ref = tables()
    layout = torch.ones(1, T, dtype=torch.bool)
    expected = 0
    for ids, prob, policy, reference in _all_sequences(theta, ref):
        k1 = kl_estimate(policy, reference, ids, "k1").detach()
        rb = kl_estimate(policy, reference, ids, "rb")
        surrogate = diagnostics.sequence_surrogate(name, policy, ids, layout, k1, rb.detach(), rb)
        expected = expected + prob.detach() * surrogate.sum()
    exact = torch.autograd.grad(exact_sequence_kl(theta, ref), theta)[0]
    torch.testing.assert_close(torch.autograd.grad(expected, theta)[0], exact, atol=1e-10, rtol=1e-8)


def _sequence_moments(per_token):
    """Mean and variance over the enumerated sequences of Σ_t per_token(policy, ref, ids)."""
    values, probs = [], []
    for ids, prob, policy, reference in _all_sequences(*tables()):
        values.append(per_token(policy.detach(), reference, ids).sum())
        probs.append(prob.detach())
    values, probs = torch.stack(values), torch.stack(probs)
    mean = (probs * values).sum()
    return mean, (probs * (values - mean) ** 2).sum()


def test_rb_variance_at_the_token_level_and_at_the_sequence_level():
    """With the history fixed, rb is deterministic: zero variance, the minimum. Over whole sequences
    the Rao-Blackwellized paper's ordering Var(rb) <= Var(k1) holds on this model, but it is not a
    theorem: the second case below is a two-step model where Σ_t k1 is constant and Σ_t rb is not."""
    means, variances = {}, {}
    for name in diagnostics.UNBIASED_ESTIMATORS:
        means[name], variances[name] = _sequence_moments(
            lambda p, q, ids: diagnostics.token_estimate(name, p, q, ids, top_k=2)
        )
    for name in diagnostics.UNBIASED_ESTIMATORS:
        assert means[name].item() == pytest.approx(means["rb"].item(), rel=1e-9)
        assert variances["rb"] <= variances[name]

    # step 1: p = (1/2, 1/2), q = (1/4, 3/4); step 2: p puts all mass on token 0, whose q is 1 after
    # token 0 and 1/3 after token 1. Then log p(y)/q(y) = log 2 for both sequences.
    inf = -math.inf
    p1, q1 = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.75]))
    p2, q2 = torch.tensor([0.0, inf]), {0: torch.tensor([0.0, inf]), 1: torch.log(torch.tensor([1 / 3, 2 / 3]))}
    totals = {"k1": [], "rb": []}
    for first in (0, 1):
        policy, ref = torch.stack([p1, p2]), torch.stack([q1, q2[first]])
        for name in totals:
            totals[name].append(kl_estimate(policy, ref, torch.tensor([first, 0]), name).sum())
    k1, rb = torch.stack(totals["k1"]), torch.stack(totals["rb"])
    torch.testing.assert_close(k1.mean(), rb.mean())  # both unbiased: each sequence has probability 1/2
    assert k1.var() < 1e-12 and rb.var() > 0.1


def test_bootstrap_and_gradient_spread():
    g = torch.Generator().manual_seed(0)
    noisy, exact = torch.randn(400, generator=g) + 2.0, torch.full((400,), 2.0)
    out = diagnostics.bias_variance({"rb": exact, "k1": noisy}, [1, 16], draws=2000, generator=g)
    assert out["truth"] == pytest.approx(2.0)
    assert out["estimators"]["rb"]["std"] == [pytest.approx(0.0, abs=1e-12)] * 2
    std1, std16 = out["estimators"]["k1"]["std"]
    assert std1 == pytest.approx(1.0, rel=0.1) and std16 == pytest.approx(0.25, rel=0.1)  # 1/sqrt(M)
    grads = {
        "rb": torch.ones(400, 3),
        "k1": torch.ones(400, 3) + torch.randn(400, 3, generator=g),
        "rb-seq": torch.ones(400, 3),
        "mc-seq": -torch.ones(400, 3),
    }
    spread = diagnostics.gradient_spread(grads, batch=4, draws=2000, generator=g)
    assert spread["rb"]["total_var"] == pytest.approx(0.0, abs=1e-12)
    assert spread["k1"]["total_var"] == pytest.approx(3 / 4, rel=0.15)  # 3 unit-variance coordinates / batch 4
    assert spread["mc-seq"]["cos_to_exact"] == pytest.approx(-1.0)
    assert spread["rb"]["norm_mean"] == pytest.approx(math.sqrt(3))

"""The math of `tike-trl analyze` (tike_trl/analysis/diagnostics.py) on random logits and by exact
enumeration: truncation identities, per-sequence gradients, the sequence-level gradients (against
the dense oracle `sequence_kl_surrogate`, and unbiased by enumeration), the leave-one-out baseline
over a batch, and what "rb has the smallest variance" does and does not guarantee."""

import itertools
import math

import pytest
import torch
from tabular import T, V, exact_sequence_kl, histories, seq_logprob, tables

from tike_trl import kl_estimate, sequence_kl_surrogate
from tike_trl.analysis import diagnostics
from tike_trl.estimators import baseline_offset, score_term

SEQUENCE_UNBIASED = [
    *(diagnostics.gradient_name(e, kind) for e in diagnostics.UNBIASED_ESTIMATORS for kind in ("seq", "seq-mean")),
    diagnostics.MC_SEQUENCE,
]


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


class _TinyModel:
    """Logits = (hidden · w) @ head.T for a scale w on the hidden states (as the final norm's weight):
    S = 4 sequences of lengths 4, 3, 4, 2 (L = 4), flattened row-major as `score_chunk` expects."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.layout = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
        n, vocab, dim = int(self.layout.sum()), 30, 6
        self.hidden, self.head = torch.randn(n, dim, generator=g), torch.randn(vocab, dim, generator=g)
        self.weight = torch.rand(dim, generator=g) + 0.5
        self.ref = self.hidden @ self.head.T + torch.randn(n, vocab, generator=g)
        self.sampled = torch.randint(0, vocab, (n,), generator=g)
        self.rows = list(self.layout.sum(1).cumsum(0) - self.layout.sum(1))  # first flat position of each sequence

    def logits(self, w):
        """[n, V]; `w` is [P] (shared), [n, P] (one copy per position) or None (the weight itself)."""
        return (self.hidden * (self.weight if w is None else w)) @ self.head.T

    def dense(self, w, sequences):
        """Policy logits, reference logits, ids and mask of `sequences` padded to [len, L(, V)]."""
        length, vocab = self.layout.shape[1], self.ref.shape[1]
        flat_of = torch.full(self.layout.shape, -1).masked_scatter(self.layout, torch.arange(int(self.layout.sum())))
        idx = flat_of[sequences]  # [B, L], -1 at padding
        pad = idx < 0
        logits = self.logits(w)[idx.clamp(min=0)].masked_fill(pad[..., None], 0.0)
        ref = self.ref[idx.clamp(min=0)].masked_fill(pad[..., None], 0.0)
        ids = self.sampled[idx.clamp(min=0)].masked_fill(pad, 0)
        assert logits.shape == (len(sequences), length, vocab)
        return logits, ref, ids, (~pad).float()


def _surrogate_options(name):
    estimator, _, tail = name.partition("-")
    return dict(estimator=estimator, top_k=2, tail=tail or "sampled")


@pytest.fixture(scope="module")
def tiny():
    model = _TinyModel()
    scores = diagnostics.score_chunk(
        model.logits, model.weight, model.ref, model.sampled, model.layout, (2, 8), top_k=2
    )
    return model, scores


def test_score_chunk_per_sequence_gradients(tiny):
    """Each sequence's token-level gradient is the gradient of that sequence's loss alone, for a
    parameter shared by every position (here: a scale on the hidden states, as the final norm's weight)."""
    model, scores = tiny
    parts = scores.gradients
    assert parts.score.shape == (4, 4, 6) and set(parts.token) == set(parts.future) == set(
        diagnostics.VALUE_ESTIMATORS
    )
    assert (parts.score[~model.layout] == 0).all() and all(
        (f[~model.layout] == 0).all() for f in parts.future.values()
    )
    for s, length in enumerate(model.layout.sum(1).tolist()):
        rows = slice(model.rows[s], model.rows[s] + length)
        w = model.weight.clone().requires_grad_()
        logits = model.logits(w)[rows]
        for name in ("k1", "rb", "tike-mc"):
            value = diagnostics.token_estimate(name, logits, model.ref[rows], model.sampled[rows], 2)
            torch.testing.assert_close(scores.sequence_values[name][s], value.sum().detach())
            torch.testing.assert_close(parts.token[name][s], torch.autograd.grad(value.sum(), w, retain_graph=True)[0])


@pytest.mark.parametrize("name", diagnostics.VALUE_ESTIMATORS)
def test_sequence_gradients_equal_the_dense_surrogate(tiny, name):
    """<est>-seq is autograd of `sequence_kl_surrogate` for each sequence; <est>-seq-mean subtracts
    the score term of the pool's mean future KL; <est>-seq-loo, composed from the per-sequence
    pieces, is the gradient of the surrogate's leave-one-out over a batch (a repeated member included)."""
    model, scores = tiny
    rows = diagnostics.per_sequence_gradients(scores.gradients)
    baseline = scores.gradients.future[name].mean(0) + baseline_offset(name.split("-")[0])  # k1's: of 1 + F_t
    for s in range(4):
        w = model.weight.clone().requires_grad_()
        logits, ref, ids, mask = model.dense(w, torch.tensor([s]))
        surrogate = sequence_kl_surrogate(logits, ref, ids, mask, **_surrogate_options(name)).sum()
        dense = torch.autograd.grad(surrogate, w, retain_graph=True)[0]
        torch.testing.assert_close(
            rows[diagnostics.gradient_name(name, "seq")][s].float(), dense, atol=1e-5, rtol=1e-4
        )
        logp_o = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
        dense_mean = dense - torch.autograd.grad((score_term(logp_o, baseline.expand_as(logp_o)) * mask).sum(), w)[0]
        torch.testing.assert_close(
            rows[diagnostics.gradient_name(name, "seq-mean")][s].float(), dense_mean, atol=1e-5, rtol=1e-4
        )
    batches = torch.tensor([[0, 2, 2, 3], [1, 0, 3, 2], [3, 3, 1, 1]])
    loo = diagnostics.loo_batch_gradients(scores.gradients, batches, max_elements=1)[f"{name}-seq-loo"]
    for b, members in enumerate(batches):
        w = model.weight.clone().requires_grad_()
        logits, ref, ids, mask = model.dense(w, members)
        surrogate = sequence_kl_surrogate(logits, ref, ids, mask, group_size=4, **_surrogate_options(name)).mean()
        torch.testing.assert_close(loo[b].float(), torch.autograd.grad(surrogate, w)[0], atol=1e-5, rtol=1e-4)
    if name == "k1":  # mc-seq is k1-seq without k1's own (zero-mean) gradient
        torch.testing.assert_close(rows["mc-seq"], rows["k1-seq"] - rows["k1"])


def _enumerated_gradients():
    """Every sequence of the tabular model scored as one chunk (the whole table is the parameter
    vector, one copy per position): its probabilities, the gradient pieces, and ∇ of the exact KL."""
    theta, ref = tables()
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    rows = torch.tensor([histories(seq.tolist()) for seq in seqs]).flatten()
    steps = torch.arange(T).repeat(len(seqs))

    def logits_fn(w):
        if w is None:
            return theta[steps, rows]
        return w.view(-1, *theta.shape)[torch.arange(len(rows)), steps, rows]

    layout = torch.ones(len(seqs), T, dtype=torch.bool)
    scores = diagnostics.score_chunk(
        logits_fn, theta.detach().flatten(), ref[steps, rows], seqs.flatten(), layout, (2,), top_k=2
    )
    probs = torch.stack([seq_logprob(theta, seq.tolist()).exp().detach() for seq in seqs])
    exact = torch.autograd.grad(exact_sequence_kl(theta, ref), theta)[0].flatten()
    return probs, scores.gradients, exact


def test_sequence_gradients_are_unbiased():
    """k1, k3 (with TRL's ratio), rb and tike-mc: the sequence-level gradient, with or without a
    constant baseline, and with the leave-one-out baseline over i.i.d. pairs, has expectation ∇ of
    the exact sequence KL (125 sequences, 125² pairs, enumerated); tike-drop's does not."""
    probs, parts, exact = _enumerated_gradients()
    rows = diagnostics.per_sequence_gradients(parts)
    for name in SEQUENCE_UNBIASED:
        torch.testing.assert_close(probs @ rows[name], exact, atol=1e-10, rtol=1e-8, msg=name)
    assert (probs @ rows["tike-drop-seq"] - exact).abs().max() > 1e-2
    assert (probs @ rows["rb"] - exact).abs().max() > 1e-2  # the token level misses the future KL
    pairs = torch.cartesian_prod(torch.arange(len(probs)), torch.arange(len(probs)))
    loo = diagnostics.loo_batch_gradients(parts, pairs)
    weights = probs[pairs[:, 0]] * probs[pairs[:, 1]]
    for name in diagnostics.UNBIASED_ESTIMATORS:
        torch.testing.assert_close(weights @ loo[f"{name}-seq-loo"], exact, atol=1e-10, rtol=1e-8, msg=name)


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
    assert (
        diagnostics.gradient_name("rb", "token") == "rb" and diagnostics.gradient_name("rb", "seq-loo") == "rb-seq-loo"
    )


def _parts(token, score, future):
    names = diagnostics.VALUE_ESTIMATORS
    return diagnostics.GradientParts({n: token for n in names}, score, {n: future for n in names})


def test_gradient_spread_and_baselines():
    """A constant token-level gradient has no variance; a future KL that is the same for every
    sequence is removed exactly by either baseline; a future KL that is noise independent of the
    score is only made noisier by the leave-one-out baseline."""
    g = torch.Generator().manual_seed(0)
    n, length, params = 400, 5, 3
    score = torch.randn(n, length, params, generator=g, dtype=torch.float64)
    spread = diagnostics.gradient_spread(
        _parts(torch.ones(n, params, dtype=torch.float64), score, torch.full((n, length), 2.0, dtype=torch.float64)),
        batch=4,
        draws=2000,
        generator=g,
    )
    assert list(spread) == list(diagnostics.GRADIENT_ESTIMATORS)
    assert spread["rb"]["total_var"] == pytest.approx(0.0, abs=1e-12)
    assert spread["rb"]["norm_mean"] == pytest.approx(math.sqrt(3))
    # Σ_t C_t·2 over 5 positions: variance 4·5 per coordinate, 3 coordinates, batch of 4
    assert spread["rb-seq"]["total_var"] == pytest.approx(4 * 5 * 3 / 4, rel=0.15)
    for kind in ("seq-loo", "seq-mean"):
        assert spread[f"rb-{kind}"]["total_var"] == pytest.approx(0.0, abs=1e-12)
    assert spread["rb-seq"]["cos_to_exact"] == pytest.approx(1.0)
    assert spread["rb-seq-loo"]["cos_to_exact"] == spread["rb-seq-mean"]["cos_to_exact"]  # the same expectation
    effects = diagnostics.baseline_effects(spread, [spread, spread])
    assert effects["k3"]["relative"]["seq-loo"]["total_var"] == pytest.approx(0.0, abs=1e-12)
    assert effects["k3"]["lowest_total_var"] in ("seq-loo", "seq-mean")
    assert effects["k3"]["wins"] == {"seq-loo": 2, "seq-mean": 2}

    # a future KL that is pure noise, independent of the score: baselines only add variance
    future = torch.randn(n, length, generator=g, dtype=torch.float64)
    noisy = diagnostics.gradient_spread(_parts(torch.zeros(n, params, dtype=torch.float64), score, future), 4, 2000, g)
    assert noisy["k1-seq-loo"]["total_var"] > noisy["k1-seq"]["total_var"]
    assert diagnostics.baseline_effects(noisy)["k1"]["lowest_total_var"] != "seq-loo"

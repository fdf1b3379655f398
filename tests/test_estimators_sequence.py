"""Sequence level, on a tiny autoregressive model (vocabulary 5, length 3; `tests/tabular.py`), by
enumerating all 125 sequences: the per-token estimators summed along a sampled sequence, in expectation.

- k1, k3, rb and tike-mc are unbiased for the sequence KL(π_θ‖π_ref).
- Their token-level gradient with the history held fixed (what a GRPO loss differentiates) is
  the exact gradient minus one term: E[Σ_t ∇log π(y_t|h_t) · Σ_{s>t} D_s], the effect of a token
  on the KL of the positions after it (arXiv 2506.09477, §4). The test checks that identity, so
  the docs can say precisely what the trainer optimises.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from tabular import T, V, exact_sequence_kl, histories, seq_logprob, tables

from tike_trl import kl_estimate

TOL = dict(atol=1e-10, rtol=1e-8)


def _token_estimates(theta, ref, seq, **kwargs):
    """The per-token estimates along one sequence, [T], on-policy."""
    rows = histories(seq)
    policy = torch.stack([theta[t, h] for t, h in enumerate(rows)])
    reference = torch.stack([ref[t, h] for t, h in enumerate(rows)])
    ids = torch.tensor(seq)
    old = F.log_softmax(policy, -1).detach().gather(-1, ids[:, None]).squeeze(-1)
    return kl_estimate(policy, reference, ids, old_logprobs=old, **kwargs)


def _expected(theta, ref, **kwargs):
    """E_y[Σ_t estimate_t] with sequence weights held fixed: the history-fixed token-level objective."""
    total = 0
    for seq in itertools.product(range(V), repeat=T):
        weight = seq_logprob(theta, seq).exp().detach()
        total = total + weight * _token_estimates(theta, ref, seq, **kwargs).sum()
    return total


def _future_kl_score_term(theta, ref):
    """E[Σ_t ∇log π(y_t|h_t)·sg(Σ_{s>t} D_s)], as a surrogate whose gradient is that term."""
    total = 0
    for seq in itertools.product(range(V), repeat=T):
        weight = seq_logprob(theta, seq).exp().detach()
        exact_per_token = _token_estimates(theta, ref, seq, estimator="rb").detach()
        for t, h in enumerate(histories(seq)):
            future = exact_per_token[t + 1 :].sum()
            total = total + weight * F.log_softmax(theta[t, h], -1)[seq[t]] * future
    return total


@pytest.mark.parametrize(
    "kwargs",
    [dict(estimator="k1"), dict(estimator="k3"), dict(estimator="rb"), dict(estimator="tike", top_k=2, tail="mc")],
    ids=["k1", "k3", "rb", "tike-mc"],
)
def test_unbiased_for_the_sequence_kl(kwargs):
    theta, ref = tables()
    torch.testing.assert_close(_expected(theta, ref, **kwargs), exact_sequence_kl(theta, ref), **TOL)


@pytest.mark.parametrize(
    "kwargs", [dict(estimator="rb"), dict(estimator="tike", top_k=2, tail="mc")], ids=["rb", "tike-mc"]
)
def test_token_level_gradient_misses_exactly_the_future_kl_term(kwargs):
    theta, ref = tables()
    token_level = torch.autograd.grad(_expected(theta, ref, **kwargs), theta)[0]
    missing = torch.autograd.grad(_future_kl_score_term(theta, ref), theta)[0]
    exact = torch.autograd.grad(exact_sequence_kl(theta, ref), theta)[0]
    torch.testing.assert_close(token_level + missing, exact, **TOL)
    assert missing.abs().max() > 1e-2  # the term is real, not rounding


def test_tike_drop_underestimates_the_sequence_kl_by_the_tails():
    theta, ref = tables()
    exact = exact_sequence_kl(theta, ref)
    drop = _expected(theta, ref, estimator="tike", top_k=2, tail="drop")
    full = _expected(theta, ref, estimator="tike", top_k=V, tail="drop", importance_weight=False)
    torch.testing.assert_close(full, exact, **TOL)
    assert abs((exact - drop).item()) > 1e-2

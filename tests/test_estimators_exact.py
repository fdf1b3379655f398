"""Expected value and expected gradient of every estimator, by exact enumeration.

On-policy with the history fixed, each estimator's known outcome: k1 unbiased with zero expected
gradient; k2 biased, with the gradient of KL(π_θ‖π_ref); k3 unbiased, with the gradient of the
other direction KL(π_ref‖π_θ) (and of KL(π_θ‖π_ref) once multiplied by TRL's differentiable
ratio); rb exact in value and gradient for every outcome; tike biased by the top-k tail with
`tail="drop"` or `"sampled"`, unbiased in value and gradient with `tail="mc"`.

One token position with a vocabulary of 8: the expectation over the sampled token o ~ π_old is
the sum over all 8 outcomes weighted by π_old(o), so every check is deterministic. The analytic
answers are written here with plain torch ops, independently of `tike_trl.estimators`.
"""

import pytest
import torch
import torch.nn.functional as F

from tike_trl import kl_estimate

V = 8
TOL = dict(atol=1e-10, rtol=1e-8)


def _tables(seed: int = 0, spread: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    theta = (spread * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_()
    ref = spread * torch.randn(V, generator=g, dtype=torch.float64)
    old = spread * torch.randn(V, generator=g, dtype=torch.float64)
    return theta, ref, old


def _exact_kl(theta, ref):
    logp, logq = F.log_softmax(theta, -1), F.log_softmax(ref, -1)
    return (logp.exp() * (logp - logq)).sum()


def _kl_ref_to_policy(theta, ref):
    """KL(π_ref‖π_θ): the other direction, whose gradient k3 follows."""
    logp, logq = F.log_softmax(theta, -1), F.log_softmax(ref, -1)
    return (logq.exp() * (logq - logp)).sum()


def _grad(value, theta):
    return torch.autograd.grad(value, theta, retain_graph=True)[0]


def expectation(theta, ref, old_logits=None, differentiable_ratio=False, **kwargs):
    """E_{o~π_old}[estimate(o)] as a differentiable function of theta, by summing over all o.

    `old_logits=None` is on-policy: π_old = sg(π_θ), with old log-probs passed so r = 1.
    `differentiable_ratio` multiplies by TRL's bias-correction factor r = p(o)/π_old(o) with
    gradient (TRL's `use_bias_correction_kl`).
    """
    logp = F.log_softmax(theta, -1)
    old_logp = logp.detach() if old_logits is None else F.log_softmax(old_logits, -1)
    ids = torch.arange(V)
    est = kl_estimate(theta.expand(V, V), ref.expand(V, V), ids, old_logprobs=old_logp, **kwargs)
    if differentiable_ratio:
        est = est * torch.exp(logp - old_logp)
    return (old_logp.exp() * est).sum()


# ---- on-policy, history fixed: the known outcomes above, one test each ----


def test_k1_unbiased_value_zero_expected_gradient():
    theta, ref, _ = _tables()
    e = expectation(theta, ref, estimator="k1")
    torch.testing.assert_close(e, _exact_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad(e, theta), torch.zeros(V, dtype=torch.float64), **TOL)


def test_k2_biased_value_gradient_of_kl():
    theta, ref, _ = _tables()
    e = expectation(theta, ref, estimator="k2")
    logp, logq = F.log_softmax(theta, -1), F.log_softmax(ref, -1)
    torch.testing.assert_close(e, (logp.exp() * 0.5 * (logp - logq) ** 2).sum(), **TOL)
    assert abs(e.item() - _exact_kl(theta, ref).item()) > 1e-2  # biased
    torch.testing.assert_close(_grad(e, theta), _grad(_exact_kl(theta, ref), theta), **TOL)


def test_k3_unbiased_value_gradient_of_other_direction():
    theta, ref, _ = _tables()
    e = expectation(theta, ref, estimator="k3")
    torch.testing.assert_close(e, _exact_kl(theta, ref), **TOL)
    grad = _grad(e, theta)
    torch.testing.assert_close(grad, _grad(_kl_ref_to_policy(theta, ref), theta), **TOL)
    assert not torch.allclose(grad, _grad(_exact_kl(theta, ref), theta), atol=1e-3)


def test_k3_times_differentiable_ratio_has_gradient_of_kl():
    theta, ref, _ = _tables()
    e = expectation(theta, ref, estimator="k3", differentiable_ratio=True)
    torch.testing.assert_close(e, _exact_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad(e, theta), _grad(_exact_kl(theta, ref), theta), **TOL)


def test_rb_exact_in_value_and_gradient_for_every_outcome():
    theta, ref, _ = _tables()
    est = kl_estimate(theta.expand(V, V), ref.expand(V, V), torch.arange(V), estimator="rb")
    exact = _exact_kl(theta, ref)
    for o in range(V):
        torch.testing.assert_close(est[o], exact, **TOL)
        torch.testing.assert_close(_grad(est[o], theta), _grad(exact, theta), **TOL)


def _truncated_sum(theta, ref, top):
    logp, logq = F.log_softmax(theta, -1), F.log_softmax(ref, -1)
    return (logp.exp() * (logp - logq))[top].sum()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_tike_drop_biased_by_the_tail_gradient_of_truncated_sum(k):
    theta, ref, _ = _tables()
    top = theta.detach().topk(k).indices
    e = expectation(theta, ref, estimator="tike", top_k=k, tail="drop")
    truncated = _truncated_sum(theta, ref, top)
    torch.testing.assert_close(e, truncated, **TOL)
    logp, logq = F.log_softmax(theta, -1), F.log_softmax(ref, -1)
    rest = torch.ones(V, dtype=torch.bool)
    rest[top] = False
    tail = (logp.exp() * (logp - logq))[rest].sum()
    torch.testing.assert_close(_exact_kl(theta, ref) - e, tail, **TOL)  # the bias is exactly the tail
    torch.testing.assert_close(_grad(e, theta), _grad(truncated, theta), **TOL)


@pytest.mark.parametrize("k", [1, 3])
def test_tike_sampled_biased_by_the_partial_tail(k):
    theta, ref, _ = _tables()
    top = theta.detach().topk(k).indices
    e = expectation(theta, ref, estimator="tike", top_k=k, tail="sampled")
    logp, logq = F.log_softmax(theta, -1), F.log_softmax(ref, -1)
    p = logp.exp()
    rest = torch.ones(V, dtype=torch.bool)
    rest[top] = False
    # Σ_S p ℓ + Σ_{o∉S} p_o · (p_o ℓ_o): o lands outside S with probability p_o and adds its own term
    expected = _truncated_sum(theta, ref, top) + (p.detach() * p * (logp - logq))[rest].sum()
    torch.testing.assert_close(e, expected, **TOL)
    torch.testing.assert_close(_grad(e, theta), _grad(expected, theta), **TOL)
    partial_tail = (p * p * (logp - logq))[rest].sum()
    torch.testing.assert_close(e - _truncated_sum(theta, ref, top), partial_tail, **TOL)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_tike_mc_unbiased_value_and_gradient(k):
    theta, ref, _ = _tables()
    e = expectation(theta, ref, estimator="tike", top_k=k, tail="mc")
    torch.testing.assert_close(e, _exact_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad(e, theta), _grad(_exact_kl(theta, ref), theta), **TOL)


def test_tike_full_vocabulary_drop_no_weight_equals_rb_per_sample():
    theta, ref, old = _tables()
    ids = torch.arange(V)
    old_logp = F.log_softmax(old, -1)
    tike = kl_estimate(
        theta.expand(V, V),
        ref.expand(V, V),
        ids,
        "tike",
        top_k=V,
        tail="drop",
        importance_weight=False,
        old_logprobs=old_logp,
    )
    rb = kl_estimate(theta.expand(V, V), ref.expand(V, V), ids, "rb")
    for o in range(V):
        torch.testing.assert_close(tike[o], rb[o], **TOL)
        torch.testing.assert_close(_grad(tike[o], theta), _grad(rb[o], theta), **TOL)


def test_tike_mc_unbiased_where_the_tail_is_large():
    # a flat policy and k=2 of 8: the top-2 mass is small, so the truncated sum is far off
    theta, ref, _ = _tables(seed=3, spread=0.3)
    top = theta.detach().topk(2).indices
    assert F.softmax(theta, -1)[top].sum() < 0.4
    exact = _exact_kl(theta, ref)
    drop = expectation(theta, ref, estimator="tike", top_k=2, tail="drop")
    mc = expectation(theta, ref, estimator="tike", top_k=2, tail="mc")
    assert abs(drop.item() - exact.item()) > 0.25 * exact.item()
    torch.testing.assert_close(mc, exact, **TOL)
    torch.testing.assert_close(_grad(mc, theta), _grad(exact, theta), **TOL)


# ---- off-policy: o ~ π_old ≠ π_θ, the importance weight at work ----


def test_off_policy_tike_mc_with_weight_unbiased():
    theta, ref, old = _tables()
    e = expectation(theta, ref, old, estimator="tike", top_k=3, tail="mc")
    torch.testing.assert_close(e, _exact_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad(e, theta), _grad(_exact_kl(theta, ref), theta), **TOL)


def test_off_policy_tike_mc_without_weight_biased():
    theta, ref, old = _tables()
    e = expectation(theta, ref, old, estimator="tike", top_k=3, tail="mc", importance_weight=False)
    assert abs(e.item() - _exact_kl(theta, ref).item()) > 1e-2


def test_off_policy_tike_sampled_weight_removes_dependence_on_old_policy():
    theta, ref, old = _tables()
    on = expectation(theta, ref, estimator="tike", top_k=2, tail="sampled")
    off = expectation(theta, ref, old, estimator="tike", top_k=2, tail="sampled")
    unweighted = expectation(theta, ref, old, estimator="tike", top_k=2, tail="sampled", importance_weight=False)
    torch.testing.assert_close(off, on, **TOL)
    torch.testing.assert_close(_grad(off, theta), _grad(on, theta), **TOL)
    assert abs(unweighted.item() - on.item()) > 1e-3


@pytest.mark.parametrize("weighted", [True, False])
def test_off_policy_tike_drop_integrates_top_k_exactly(weighted):
    theta, ref, old = _tables()
    top = theta.detach().topk(3).indices
    e = expectation(theta, ref, old, estimator="tike", top_k=3, tail="drop", importance_weight=weighted)
    torch.testing.assert_close(e, _truncated_sum(theta, ref, top), **TOL)
    torch.testing.assert_close(_grad(e, theta), _grad(_truncated_sum(theta, ref, top), theta), **TOL)


def test_off_policy_k1_plain_is_biased():
    theta, ref, old = _tables()
    e = expectation(theta, ref, old, estimator="k1")
    logp, logq = F.log_softmax(theta, -1), F.log_softmax(ref, -1)
    torch.testing.assert_close(e, (F.softmax(old, -1) * (logp - logq)).sum(), **TOL)
    assert abs(e.item() - _exact_kl(theta, ref).item()) > 1e-2


def test_off_policy_k3_times_differentiable_ratio_unbiased_in_value_and_gradient():
    theta, ref, old = _tables()
    e = expectation(theta, ref, old, estimator="k3", differentiable_ratio=True)
    torch.testing.assert_close(e, _exact_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad(e, theta), _grad(_exact_kl(theta, ref), theta), **TOL)


def test_off_policy_rb_does_not_depend_on_old_policy():
    theta, ref, old = _tables()
    e = expectation(theta, ref, old, estimator="rb")
    torch.testing.assert_close(e, _exact_kl(theta, ref), **TOL)
    torch.testing.assert_close(_grad(e, theta), _grad(_exact_kl(theta, ref), theta), **TOL)

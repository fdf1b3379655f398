"""The tiled heads against the dense formulas (`tike_trl.estimators`), values and gradients.

Small tiles (16 tokens x 64 columns, top-k blocks of 8 columns) so that every test crosses token
and vocabulary tile boundaries, including ragged last tiles. On a CUDA machine the same tests
run there too (TRL's Triton folds); without CUDA those cases skip.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tike_trl.estimators import TopKLogProbs, exact_kl, importance_ratio, kl_estimate, truncated_kl
from tike_trl.kernels import HeadSpec, RefHead, Tiling, policy_head, reference_logprobs
from tike_trl.kernels.topk import tile_topk

TILING = Tiling(tokens=16, vocab=64, block=8, pair_tokens=16)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]
SPECS = [HeadSpec(), HeadSpec(temperature=0.7, logit_scale=1.3, softcap=5.0)]


def make_head(n=37, d=12, vocab=203, dtype=torch.float32, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) / d**0.25
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight)]
    b = None if b is None else b.to(device=device, dtype=dtype).requires_grad_()
    return tensors[0], tensors[1], b, targets.to(device)


def dense_logits(hidden, weight, bias, spec, dtype=None):
    """The head's logits as the kernel computes them: projection in the inputs' dtype, then fp32."""
    y = hidden @ weight.t()
    if bias is not None:
        y = y + bias
    y = y.float()
    if spec.softcap is not None:
        y = spec.softcap * torch.tanh(y * spec.logit_scale / spec.softcap)
    else:
        y = y * spec.logit_scale
    return y / spec.temperature


def assert_valid_topk(indices, logits, k):
    """Each row's indices are k distinct columns, none below any column left out."""
    assert indices.shape[-1] == k
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "duplicate indices"
    chosen = logits.gather(-1, indices)
    left_out = logits.scatter(-1, indices, float("-inf"))
    assert (chosen.min(-1).values >= left_out.max(-1).values).all()


def grads(outputs, inputs):
    return torch.autograd.grad(outputs, [x for x in inputs if x is not None], allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=["plain", "scale-softcap-temp"])
@pytest.mark.parametrize("k", [1, 16, 150])
def test_policy_head_fp32(device, spec, k):
    hidden, weight, bias, targets = make_head(device=device)
    out = policy_head(hidden, weight, bias, targets, spec, top_k=k, tiling=TILING)
    logp = F.log_softmax(dense_logits(hidden, weight, bias, spec), -1)
    torch.testing.assert_close(out.logprob, logp.gather(1, targets[:, None]).squeeze(1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.topk_logprobs.sort(-1).values, logp.topk(k).values.sort(-1).values, atol=2e-5, rtol=1e-5
    )
    assert_valid_topk(out.topk_indices, logp, k)
    torch.testing.assert_close(out.topk_logprobs, logp.gather(1, out.topk_indices), atol=2e-5, rtol=1e-5)

    g = torch.Generator().manual_seed(1)
    g_o, g_h, g_s = (torch.randn(s, generator=g).to(device) for s in [(37,), (37,), (37, k)])
    loss = (out.logprob * g_o).sum() + (out.entropy * g_h).sum() + (out.topk_logprobs * g_s).sum()
    dense = (
        (logp.gather(1, targets[:, None]).squeeze(1) * g_o).sum()
        - ((logp.exp() * logp).sum(-1) * g_h).sum()
        + (logp.gather(1, out.topk_indices) * g_s).sum()
    )
    for a, b in zip(grads(loss, (hidden, weight, bias)), grads(dense, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_policy_head_k1024_full_tile_select(device):
    hidden, weight, bias, targets = make_head(n=21, vocab=1500, device=device)
    out = policy_head(hidden, weight, bias, targets, HeadSpec(), top_k=1024, tiling=Tiling(tokens=16, vocab=256))
    logp = F.log_softmax(dense_logits(hidden, weight, bias, HeadSpec()), -1)
    assert_valid_topk(out.topk_indices, logp, 1024)
    torch.testing.assert_close(out.topk_logprobs, logp.gather(1, out.topk_indices), atol=2e-5, rtol=1e-5)
    g_s = torch.randn(21, 1024, generator=torch.Generator().manual_seed(2)).to(device)
    a = grads((out.topk_logprobs * g_s).sum(), (hidden, weight))
    b = grads((logp.gather(1, out.topk_indices) * g_s).sum(), (hidden, weight))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 16])
def test_policy_head_bf16(device, k):
    """bf16 inputs: the tiles are bf16 like TRL's, the statistics fp32. The top-k set is a top-k
    of the bf16-rounded logits the head computes (the same values its log-probs come from)."""
    hidden, weight, bias, targets = make_head(dtype=torch.bfloat16, device=device)
    out = policy_head(hidden, weight, bias, targets, HeadSpec(), top_k=k, tiling=TILING)
    rounded = dense_logits(hidden, weight, bias, HeadSpec())  # bf16 projection, then fp32
    logp = F.log_softmax(rounded, -1)
    torch.testing.assert_close(out.logprob, logp.gather(1, targets[:, None]).squeeze(1), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(
        out.topk_logprobs.sort(-1).values, logp.topk(k).values.sort(-1).values, atol=2e-2, rtol=1e-2
    )
    # against the fp32 oracle of the same weights, gradients agree to bf16 precision
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (hidden, weight, bias))
    logp32 = F.log_softmax(dense_logits(h32, w32, b32, HeadSpec()), -1)
    g_s = torch.randn(37, k, generator=torch.Generator().manual_seed(3)).to(device)
    a = grads((out.topk_logprobs * g_s).sum() + out.logprob.sum(), (hidden, weight))
    b = grads((logp32.gather(1, out.topk_indices) * g_s).sum() + logp32.gather(1, targets[:, None]).sum(), (h32, w32))
    for x, y in zip(a, b):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x.float(), y, atol=5e-2, rtol=5e-2)


def test_ties_give_a_valid_top_k_set():
    # duplicated head rows: many exactly tied logits, across blocks and tiles
    hidden, weight, bias, targets = make_head(vocab=200, bias=False)
    with torch.no_grad():
        weight[100:] = weight[:100]
    out = policy_head(hidden, weight, None, targets, HeadSpec(), top_k=16, tiling=TILING)
    logits = dense_logits(hidden, weight, None, HeadSpec())
    assert_valid_topk(out.topk_indices, logits, 16)


def test_tile_topk_block_select_matches_full_topk_values():
    g = torch.Generator().manual_seed(4)
    tile = torch.randn(9, 1000, generator=g).round(decimals=1)  # many ties
    for k in (1, 3, 16, 60):
        values, columns = tile_topk(tile, k, block=8)
        torch.testing.assert_close(values.sort(-1, descending=True).values, tile.topk(k).values)  # in any order
        assert_valid_topk(columns, tile, k)


@pytest.mark.parametrize("device", DEVICES)
def test_minus_inf_logits_padded_vocabulary(device):
    """Rows of the head that can never be sampled (bias -inf, as a masked padded vocabulary):
    no mass, never in the top-k, finite gradients, identical to the dense formulas."""
    hidden, weight, bias, targets = make_head(device=device)
    with torch.no_grad():
        bias[180:] = float("-inf")
    targets = targets % 180
    out = policy_head(hidden, weight, bias, targets, HeadSpec(), top_k=16, tiling=TILING)
    logp = F.log_softmax(dense_logits(hidden, weight, bias, HeadSpec()), -1)
    assert (out.topk_indices < 180).all()
    torch.testing.assert_close(out.logprob, logp.gather(1, targets[:, None]).squeeze(1), atol=2e-5, rtol=1e-5)
    entropy = -torch.where(logp.isinf(), 0, logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out.entropy, entropy, atol=2e-5, rtol=1e-5)
    loss = out.logprob.sum() + out.entropy.sum() + out.topk_logprobs.sum()
    for g in grads(loss, (hidden, weight, bias)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("exact", [False, True], ids=["topk-head", "exact-kl-head"])
def test_empty_input_all_masked_micro_batch(exact):
    """TRL's fused head on CUDA scores only the labelled rows: an all-masked micro-batch gives none."""
    hidden, weight, bias, targets = make_head(n=0)
    ref = RefHead(hidden.detach(), weight.detach()) if exact else None
    out = policy_head(hidden, weight, bias, targets, HeadSpec(), top_k=4, ref=ref, tiling=TILING)
    assert out.logprob.shape == (0,) and out.topk_indices.shape == (0, 4)
    loss = out.logprob.sum() + out.topk_logprobs.sum() + (out.exact_kl.sum() if exact else 0)
    g = grads(loss, (hidden, weight))
    assert g[0].shape == (0, 12) and torch.count_nonzero(g[1]) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=["plain", "scale-softcap-temp"])
def test_reference_logprobs(device, dtype, spec):
    """bf16: the reference tiles are bf16 like TRL's reference head; log-probs come back fp32."""
    hidden, weight, bias, targets = make_head(device=device, seed=5, dtype=dtype)
    indices = torch.randint(0, 203, (37, 5), generator=torch.Generator().manual_seed(6)).to(device)
    got = reference_logprobs(hidden, weight, bias, indices, spec, TILING)
    want = F.log_softmax(dense_logits(hidden, weight, bias, spec), -1).gather(1, indices)
    assert got.dtype == torch.float32 and not got.requires_grad
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, want.detach(), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=["plain", "scale-softcap-temp"])
def test_exact_kl_head(device, dtype, spec):
    hidden, weight, bias, targets = make_head(device=device, dtype=dtype)
    ref_h, ref_w, ref_b, _ = make_head(device=device, dtype=dtype, seed=7)
    ref = RefHead(ref_h.detach(), ref_w.detach(), ref_b.detach(), spec)
    out = policy_head(hidden, weight, bias, targets, spec, top_k=4, ref=ref, tiling=TILING)
    # the exact head projects in fp32 (as TRL's chunked divergence), so compare with fp32 math
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (hidden, weight, bias))
    logp = F.log_softmax(dense_logits(h32, w32, b32, spec), -1)
    logq = F.log_softmax(dense_logits(ref_h.float(), ref_w.float(), ref_b.float(), spec), -1)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.exact_kl, exact_kl(logp, logq), **tol)
    torch.testing.assert_close(out.logprob, logp.gather(1, targets[:, None]).squeeze(1), **tol)
    torch.testing.assert_close(out.topk_logprobs, logp.gather(1, out.topk_indices), **tol)
    g = torch.Generator().manual_seed(8)
    g_d, g_o, g_h = (torch.randn(37, generator=g).to(device) for _ in range(3))
    loss = (out.exact_kl * g_d).sum() + (out.logprob * g_o).sum() + (out.entropy * g_h).sum()
    dense = (
        (exact_kl(logp, logq) * g_d).sum()
        + (logp.gather(1, targets[:, None]).squeeze(1) * g_o).sum()
        - ((logp.exp() * logp).sum(-1) * g_h).sum()
    )
    for a, b in zip(grads(loss, (hidden, weight, bias)), grads(dense, (h32, w32, b32))):
        torch.testing.assert_close(
            a.float(), b, **({"atol": 5e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2})
        )


def test_exact_kl_head_only_kl_gradient():
    hidden, weight, bias, targets = make_head()
    ref_h, ref_w, _, _ = make_head(seed=9)
    out = policy_head(
        hidden, weight, bias, targets, HeadSpec(), ref=RefHead(ref_h.detach(), ref_w.detach()), tiling=TILING
    )
    logp = F.log_softmax(dense_logits(hidden, weight, bias, HeadSpec()), -1)
    logq = F.log_softmax(dense_logits(ref_h, ref_w, None, HeadSpec()), -1).detach()
    for a, b in zip(
        grads(out.exact_kl.sum(), (hidden, weight, bias)), grads(exact_kl(logp, logq).sum(), (hidden, weight, bias))
    ):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_kl_grad_rows", ["none", "masked", "kl-only"])
def test_exact_kl_head_one_kernel_backward(device, zero_kl_grad_rows):
    """No entropy gradient (as in GRPO): the KL kernel also forms the dense log-prob terms.
    "masked": some rows have no gradient at all (padding); "kl-only": some rows have a log-prob
    gradient but no KL gradient, where that cannot apply and the two-kernel backward runs."""
    hidden, weight, bias, targets = make_head(device=device)
    ref_h, ref_w, ref_b, _ = make_head(device=device, seed=12)
    out = policy_head(
        hidden,
        weight,
        bias,
        targets,
        HeadSpec(),
        top_k=4,
        ref=RefHead(ref_h.detach(), ref_w.detach(), ref_b.detach()),
        tiling=TILING,
    )
    g = torch.Generator().manual_seed(13)
    g_d, g_o, g_s = (torch.randn(s, generator=g).to(device) for s in [(37,), (37,), (37, 4)])
    if zero_kl_grad_rows != "none":
        g_d[::3] = 0.0
    if zero_kl_grad_rows == "masked":
        g_o[::3], g_s[::3] = 0.0, 0.0
    loss = (out.exact_kl * g_d).sum() + (out.logprob * g_o).sum() + (out.topk_logprobs * g_s).sum()
    logp = F.log_softmax(dense_logits(hidden, weight, bias, HeadSpec()), -1)
    logq = F.log_softmax(dense_logits(ref_h, ref_w, ref_b, HeadSpec()), -1).detach()
    dense = (
        (exact_kl(logp, logq) * g_d).sum()
        + (logp.gather(1, targets[:, None]).squeeze(1) * g_o).sum()
        + (logp.gather(1, out.topk_indices) * g_s).sum()
    )
    for a, b in zip(grads(loss, (hidden, weight, bias)), grads(dense, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_kl_head_minus_inf_logits(device):
    """Padded vocabulary rows (bias -inf in both heads): no mass, no KL, finite gradients equal
    to the dense formulas'."""
    hidden, weight, bias, targets = make_head(device=device)
    ref_h, ref_w, ref_b, _ = make_head(device=device, seed=14)
    with torch.no_grad():
        bias[180:] = float("-inf")
        ref_b[180:] = float("-inf")
    targets = targets % 180
    out = policy_head(
        hidden,
        weight,
        bias,
        targets,
        HeadSpec(),
        top_k=16,
        ref=RefHead(ref_h.detach(), ref_w.detach(), ref_b.detach()),
        tiling=TILING,
    )
    logp = F.log_softmax(dense_logits(hidden, weight, bias, HeadSpec()), -1)
    logq = F.log_softmax(dense_logits(ref_h, ref_w, ref_b, HeadSpec()), -1).detach()
    assert (out.topk_indices < 180).all()
    torch.testing.assert_close(out.exact_kl, exact_kl(logp, logq), atol=2e-5, rtol=1e-5)
    loss = out.exact_kl.sum() + out.logprob.sum() + out.topk_logprobs.sum()
    dense = (
        exact_kl(logp, logq).sum() + logp.gather(1, targets[:, None]).sum() + logp.gather(1, out.topk_indices).sum()
    )
    for a, b in zip(grads(loss, (hidden, weight, bias)), grads(dense, (hidden, weight, bias))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, torch.nan_to_num(b, nan=0.0), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("tail", ["sampled", "drop", "mc"])
def test_kernel_pipeline_equals_kl_estimate(tail):
    """Policy head + reference log-probs + `truncated_kl` (the trainer's path) against
    `kl_estimate` on the dense logits, value and gradient, off-policy."""
    hidden, weight, bias, targets = make_head()
    ref_h, ref_w, ref_b, _ = make_head(seed=10)
    old_logp = torch.randn(37, generator=torch.Generator().manual_seed(11)).clamp(max=0) - 2.0
    out = policy_head(hidden, weight, bias, targets, HeadSpec(), top_k=5, tiling=TILING)
    logq = reference_logprobs(ref_h, ref_w, ref_b, torch.cat([out.topk_indices, targets[:, None]], 1), tiling=TILING)
    logps = TopKLogProbs(
        policy=out.topk_logprobs,
        ref=logq[:, :-1],
        policy_sampled=out.sampled_logprob,
        ref_sampled=logq[:, -1],
        sampled_in_topk=(out.topk_indices == targets[:, None]).any(-1),
    )
    ours = truncated_kl(logps, importance_ratio(out.logprob, old_logp), tail)
    dense = kl_estimate(
        dense_logits(hidden, weight, bias, HeadSpec()),
        dense_logits(ref_h, ref_w, ref_b, HeadSpec()),
        targets,
        "tike",
        top_k=5,
        tail=tail,
        old_logprobs=old_logp,
    )
    torch.testing.assert_close(ours, dense, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads(ours.sum(), (hidden, weight, bias)), grads(dense.sum(), (hidden, weight, bias))):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_head_rejects_bad_shapes():
    hidden, weight, bias, targets = make_head()
    with pytest.raises(ValueError, match="top_k=300 is larger"):
        policy_head(hidden, weight, bias, targets, top_k=300)
    with pytest.raises(ValueError, match="does not match"):
        policy_head(hidden, weight, bias, targets, ref=RefHead(hidden[:3].detach(), weight.detach()))
    with pytest.raises(ValueError, match="temperature"):
        HeadSpec(temperature=0.0)


def _sharp_bf16_head(seed=0, n=37, d=16, vocab=203):
    """bf16 head inputs with logits at the scale of a real LM's (top ones 20-30, where bf16 rounds
    each logit by ~0.03-0.06) and the fp64 log-softmax of the same bf16 numbers."""
    hidden, weight, bias, targets = make_head(n=n, d=d, vocab=vocab, seed=seed)
    with torch.no_grad():
        hidden = (hidden * 4.0).bfloat16().requires_grad_()
        weight, bias = weight.detach().bfloat16().requires_grad_(), (bias.detach() + 6.0).bfloat16().requires_grad_()
    logp64 = F.log_softmax(hidden.double() @ weight.double().t() + bias.double(), -1)
    return hidden, weight, bias, targets, logp64


@pytest.mark.parametrize("exact_head", [False, True], ids=["top-k head", "exact-KL head"])
def test_kl_logprobs_are_exact_in_bf16(exact_head):
    """What the KL reads (log p at S ∪ {o}, log q there) is accurate in bf16, while the label
    log-prob the policy gradient reads stays TRL's bf16 arithmetic."""
    hidden, weight, bias, targets, logp64 = _sharp_bf16_head()
    ref_h, ref_w, ref_b, _, logq64 = _sharp_bf16_head(seed=4)
    ref = RefHead(ref_h.detach(), ref_w.detach(), ref_b.detach()) if exact_head else None
    out = policy_head(hidden, weight, bias, targets, HeadSpec(), top_k=6, ref=ref, tiling=TILING)
    columns = torch.cat([out.topk_indices, targets[:, None]], 1)
    want = logp64.gather(1, columns)
    got = torch.cat([out.topk_logprobs, out.sampled_logprob[:, None]], 1).double()
    rounded = F.log_softmax(dense_logits(hidden, weight, bias, HeadSpec()).double(), -1).gather(1, columns)
    assert (rounded - want).abs().max() > 1e-2  # what the bf16 tiles alone give
    # what is left is the rounding of the other logits (at most one bf16 step each: the product and
    # then the bias are rounded, as in TRL's head), weighted by their mass, through the normaliser
    in_a = torch.zeros_like(logp64, dtype=torch.bool).scatter(1, columns, True)

    def tail_bound(logp, hidden, weight, bias):
        logits = hidden.double() @ weight.double().t() + bias.double()
        step = torch.exp2(torch.floor(torch.log2(logits.abs().clamp(min=1e-30))) - 7)
        return torch.where(in_a, 0.0, logp.exp() * step).sum(1, keepdim=True) + 2e-5

    assert ((got - want).abs() <= tail_bound(logp64, hidden, weight, bias)).all()
    # the policy gradient's label log-prob is still the rounded one
    torch.testing.assert_close(out.logprob.double(), rounded[:, -1], atol=1e-5, rtol=0)
    logq = reference_logprobs(ref_h, ref_w, ref_b, columns, HeadSpec(), TILING).double()
    assert ((logq - logq64.gather(1, columns)).abs() <= tail_bound(logq64, ref_h, ref_w, ref_b)).all()
    # gradient of a functional of the KL's log-probs, against fp64 through the same bf16 numbers
    g = torch.randn(columns.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    h64 = hidden.detach().double().requires_grad_()
    dense = (F.log_softmax(h64 @ weight.double().t() + bias.double(), -1).gather(1, columns) * g).sum()
    (want_grad,) = torch.autograd.grad(dense, h64)
    (got_grad,) = torch.autograd.grad((got * g).sum(), hidden)
    assert ((got_grad.double() - want_grad).norm() / want_grad.norm()).item() < 1e-2

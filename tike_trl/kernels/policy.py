"""The policy's LM head in one tiled pass: what TRL's fused head returns (log-prob of the label,
entropy) plus the top-k indices and their log-probs, and optionally the exact KL to a reference
head, all differentiable, never holding more than one `[token_chunk, vocab_chunk]` tile.

Backward recomputes each tile. For any upstream gradients g_o (label log-prob), g_S (top-k
log-probs), g_H (entropy) and g_D (exact KL), the logits gradient of a row is

    dL/dz_j = g_o·(1[j=o] − p_j) + Σ_{i∈S} g_i·(1[j=i] − p_j) − g_H·p_j(log p_j + H) + g_D·p_j(ℓ_j − D).

TRL's backward kernel already forms G·(1[j=o] − p_j) and the entropy term; passing
G = g_o + Σ_i g_i leaves only a sparse correction at the k+1 columns S ∪ {o}, added here. The
index choice S carries no gradient (docs/estimators.md).

With a reference head (the exact KL), TRL's divergence kernel forms g_D·p_j(ℓ_j − a) for any
per-row a. Without an entropy gradient (TRL's GRPO logs the entropy, it does not train on it),
a = D + G/g_D makes it g_D·p_j(ℓ_j − D) − G·p_j: the KL term and the dense part of the log-prob
terms in one pass over the tile, leaving g_o at the label and g_i at S to the sparse correction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .precise import corrected_log_z, exact_logits, first_occurrence, needs_exact_columns
from .tiles import RefHead, Tiling, gather_columns, head_rows, project, project_exact
from .topk import RunningTopK
from .trl_tiles import (
    HeadSpec,
    LogSumExp,
    PairStats,
    addmm_fp32,
    backward_logprob_tile,
    backward_pair_tile,
    compute_dtype,
    maybe_gather_lm_head_ctx,
)


@dataclass
class HeadOutputs:
    """Per-row results of :func:`policy_head`; log-probs are float32 and differentiable."""

    logprob: torch.Tensor  # [N] log p(label)
    entropy: torch.Tensor  # [N]
    topk_logprobs: torch.Tensor  # [N, k], in no particular order
    topk_indices: torch.Tensor  # [N, k], no gradient
    log_z: torch.Tensor  # [N], no gradient
    sampled_logprob: torch.Tensor  # [N] log p(label) as the KL reads it (exact in bf16; `logprob` is TRL's)
    exact_kl: torch.Tensor | None = None  # [N] Σ_v p_v ℓ_v, when a reference head was given


def policy_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    spec: HeadSpec = HeadSpec(),
    top_k: int = 0,
    ref: RefHead | None = None,
    tiling: Tiling = Tiling(),
    top_k_vocab: int | None = None,
) -> HeadOutputs:
    """One tiled pass over the policy head; see the module docstring. `top_k=0` skips the top-k.

    `top_k_vocab` restricts the top-k to the first rows of the head (the tokenizer's tokens):
    a head padded beyond them (e.g. 151,936 rows for 151,665 tokens) never puts a padding row in S.
    """
    choosable = head_rows(weight) if top_k_vocab is None else min(top_k_vocab, head_rows(weight))
    if top_k > choosable:
        raise ValueError(f"top_k={top_k} is larger than the {choosable} head rows it may choose from.")
    if tiling.vocab % tiling.block:
        raise ValueError(
            f"The vocabulary tile ({tiling.vocab}) must be a multiple of the top-k block ({tiling.block})."
        )
    if ref is None:
        outputs = _TopKHead.apply(hidden, weight, bias, targets, spec, top_k, tiling, top_k_vocab)
        return HeadOutputs(*outputs)
    if ref.spec.temperature != spec.temperature:
        raise ValueError("The policy and the reference head must use the same temperature.")
    if ref.hidden.shape[0] != hidden.shape[0] or head_rows(ref.weight) != head_rows(weight):
        raise ValueError(
            f"Reference head ({ref.hidden.shape[0]} rows, vocabulary {head_rows(ref.weight)}) does not match the "
            f"policy's ({hidden.shape[0]} rows, vocabulary {head_rows(weight)})."
        )
    # the reference weight and bias go in as they are: `detach()` would make new tensors without the
    # ZeRO-3 attributes that the gather needs; the Function returns no gradient for them anyway
    outputs = _ExactKLHead.apply(
        hidden,
        weight,
        bias,
        targets,
        ref.hidden.detach(),
        ref.weight,
        ref.bias,
        spec,
        ref.spec,
        top_k,
        replace(tiling, tokens=tiling.pair_tokens),
        top_k_vocab,
    )
    return HeadOutputs(*outputs)


@dataclass
class _KLColumns:
    """The columns the KL reads besides the dense pass, A = S ∪ {o} ([N, k+1], the label last), and
    the log-normaliser of their log-probs. In bf16 their logits are fp32 dot products and the
    normaliser is corrected for them (`precise.py`); in fp32 both come from the tiles."""

    indices: torch.Tensor  # [N, k+1]
    logits: torch.Tensor  # [N, k+1], float32
    log_z: torch.Tensor  # [N]
    counted: torch.Tensor | None = None  # [N, k+1] first occurrences, when the logits were recomputed

    @staticmethod
    def of(hidden, weight, bias, spec, top: RunningTopK, lse: LogSumExp, targets, log_z, dtype) -> _KLColumns:
        indices = torch.cat([top.indices, targets.unsqueeze(1)], dim=1)
        rounded = torch.cat([spec.transform(top.values), lse.target_logit.unsqueeze(1)], dim=1)
        if not needs_exact_columns(dtype):
            return _KLColumns(indices, rounded, log_z)
        logits = exact_logits(hidden, weight, bias, spec, indices, dtype)
        counted = first_occurrence(indices)
        return _KLColumns(indices, logits, corrected_log_z(log_z, rounded, logits, counted), counted)

    def logprobs(self) -> torch.Tensor:
        return self.logits - self.log_z.unsqueeze(1)


class _SparseGrad:
    """The part of a logits gradient a dense kernel does not form, at a few vocabulary columns per
    row (A = S ∪ {o}), added as w·dz/dy; dz/dy is gathered from the raw tile before the kernel
    overwrites it. With `correction = (Σ g_A, log Z*, exact logits, counted)` it also moves the
    dense term at the counted columns from the tile's rounded logits to the exact ones:
    + Σ g_A·(e^{z_j − log Z*} − e^{z*_j − log Z*})."""

    def __init__(
        self,
        tile: torch.Tensor,
        rows: slice,
        vocab_start: int,
        columns: torch.Tensor,
        weights: torch.Tensor,
        spec: HeadSpec,
        correction: tuple | None = None,
    ) -> None:
        raw, in_tile, self.columns = gather_columns(tile, columns[rows], vocab_start)
        values = weights[rows]
        if correction is not None:
            total, log_z_star, exact, counted = (t[rows] for t in correction)
            shift = log_z_star.unsqueeze(1)
            rounded = spec.transform(raw)
            moved = total.unsqueeze(1) * (torch.exp(rounded - shift) - torch.exp(exact - shift))
            values = values + torch.where(counted, moved, 0.0)
        self.values = torch.where(in_tile, values, 0.0) * spec.dlogit_draw(raw)

    def add_to(self, grad_tile: torch.Tensor) -> None:
        grad_tile.scatter_add_(1, self.columns, self.values.to(grad_tile.dtype))


def _grad_at(grad_topk: torch.Tensor | None, grad_sampled: torch.Tensor | None, n: int, k: int, device):
    """The upstream gradient of the log-probs at A = S ∪ {o} ([N, k+1]), None if there is none."""
    if grad_topk is None and grad_sampled is None:
        return None
    zeros = torch.zeros((n,), device=device)
    topk = torch.zeros((n, k), device=device) if grad_topk is None else grad_topk.float()
    return torch.cat([topk, (zeros if grad_sampled is None else grad_sampled.float()).unsqueeze(1)], dim=1)


def _dense_label_grad(
    grad_logprob: torch.Tensor | None, grad_at: torch.Tensor | None, scale: torch.Tensor | float = 1.0
) -> torch.Tensor | None:
    """G = g_o + scale·Σ_A g_A, the weight of the dense kernel's −p_j term (`scale` moves the A
    log-probs' normaliser onto the tile's: e^{log Z − log Z*})."""
    parts = [g for g in (grad_logprob, None if grad_at is None else scale * grad_at.sum(dim=1)) if g is not None]
    return sum(p.float() for p in parts).contiguous() if parts else None


def _sparse_weights(
    columns: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_at: torch.Tensor | None,
    label_in_kernel: bool,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor | None:
    """Weights at A = S ∪ {o} (the label last) of what the dense kernel does not form: g_A at A and,
    at the label, g_o minus what the kernel puts there (G·1[j=o] with G from `_dense_label_grad`
    when `label_in_kernel`, nothing otherwise). None if all zero."""
    if grad_at is None and (label_in_kernel or grad_logprob is None):
        return None
    weights = torch.zeros(columns.shape, device=columns.device) if grad_at is None else grad_at.clone()
    if label_in_kernel:
        weights[:, -1] -= scale * grad_at.sum(dim=1)
    elif grad_logprob is not None:
        weights[:, -1] += grad_logprob.float()
    return weights


def _kl_kernel_shift(
    kl: torch.Tensor, grad_kl: torch.Tensor | None, grad_label: torch.Tensor | None, grad_entropy: torch.Tensor | None
) -> torch.Tensor | None:
    """a = D + G/g_D per row, for the divergence kernel to form the KL and the dense log-prob terms
    in one pass (module docstring); None where it cannot: an entropy gradient, no KL gradient, or a
    row whose KL gradient is 0 while G is not."""
    if grad_kl is None or grad_entropy is not None:
        return None
    if grad_label is None:
        return kl
    no_kl_grad = grad_kl == 0
    if bool((no_kl_grad & (grad_label != 0)).any()):
        return None
    return kl + torch.where(no_kl_grad, 0.0, grad_label / torch.where(no_kl_grad, 1.0, grad_kl))


def _logprob_grad_tile(
    tile: torch.Tensor,
    rows: slice,
    start: int,
    spec: HeadSpec,
    targets: torch.Tensor,
    log_z: torch.Tensor,
    entropy: torch.Tensor,
    grad_label: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> None:
    """TRL's log-prob backward kernel on one tile, for these rows: G·(1[j=o] − p_j) and the entropy term."""

    def at_rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows]

    backward_logprob_tile(
        tile, targets[rows], log_z[rows], entropy[rows], at_rows(grad_label), at_rows(grad_entropy), start, spec
    )


class _Grads:
    """fp32 accumulators of the head's input gradients, fed one gradient tile at a time."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple) -> None:
        def zeros(t: torch.Tensor | None, need: bool) -> torch.Tensor | None:
            return torch.zeros(t.shape, device=t.device, dtype=torch.float32) if need and t is not None else None

        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.g_hidden, self.g_weight, self.g_bias = (
            zeros(hidden, needs[0]),
            zeros(weight, needs[1]),
            zeros(bias, needs[2]),
        )

    def add(self, grad_tile: torch.Tensor, hidden_chunk: torch.Tensor, rows: slice, start: int, end: int) -> None:
        if self.g_hidden is not None:
            addmm_fp32(self.g_hidden[rows], grad_tile, self.weight[start:end].to(grad_tile.dtype))
        if self.g_weight is not None:
            addmm_fp32(self.g_weight[start:end], grad_tile.t(), hidden_chunk.to(grad_tile.dtype))
        if self.g_bias is not None:
            self.g_bias[start:end] += grad_tile.sum(dim=0, dtype=torch.float32)

    def result(self) -> tuple:
        def cast(g: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g.to(like.dtype)

        return cast(self.g_hidden, self.hidden), cast(self.g_weight, self.weight), cast(self.g_bias, self.bias)


class _TopKHead(torch.autograd.Function):
    """Label log-prob, entropy and top-k of the policy; tiles in the compute dtype, as TRL's head.
    The log-probs at S ∪ {o} that the KL reads are recomputed exactly in bf16 (`_KLColumns`)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, spec: HeadSpec, top_k: int, tiling: Tiling, top_k_vocab: int | None
    ):
        ctx.set_materialize_grads(False)
        n, device, dtype = hidden.shape[0], hidden.device, compute_dtype(hidden)
        lse = LogSumExp(n, device)
        top = RunningTopK(n, top_k, device, top_k_vocab)
        with maybe_gather_lm_head_ctx(weight, bias):
            buf = tiling.buffer(n, weight.shape[0], device, dtype)
            for rows in tiling.rows(n):
                h = hidden[rows].to(dtype)
                for start, end in tiling.columns(weight.shape[0]):
                    tile = project(buf, h, weight, bias, start, end)
                    lse.fold(tile, rows, targets[rows], start, spec, entropy=True)
                    if top_k:
                        top.merge(tile, rows, start, tiling.block)
            log_z = lse.log_z()
            cols = _KLColumns.of(hidden, weight, bias, spec, top, lse, targets, log_z, dtype)
        entropy = lse.entropy(log_z)
        at = cols.logprobs()
        counted = cols.counted if cols.counted is not None else cols.indices.new_empty(0)
        saved = (hidden, weight, bias, targets, log_z, entropy, cols.indices, cols.logits, cols.log_z, counted)
        ctx.save_for_backward(*saved)
        ctx.spec, ctx.tiling, ctx.exact_columns = spec, tiling, cols.counted is not None
        ctx.mark_non_differentiable(top.indices, log_z)
        return lse.target_logit - log_z, entropy, at[:, :top_k], top.indices, log_z, at[:, top_k]

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, grad_topk, _indices, _log_z, grad_sampled):
        hidden, weight, bias, targets, log_z, entropy, columns, logits, kl_log_z, counted = ctx.saved_tensors
        spec, tiling = ctx.spec, ctx.tiling
        grad_at = _grad_at(grad_topk, grad_sampled, columns.shape[0], columns.shape[1] - 1, hidden.device)
        scale = torch.exp(log_z - kl_log_z)  # 1 where the KL's log-probs share the tiles' normaliser
        grad_label = _dense_label_grad(grad_logprob, grad_at, scale)
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        if grad_label is None and grad_entropy is None:
            return (None,) * 8
        weights = _sparse_weights(columns, grad_logprob, grad_at, label_in_kernel=True, scale=scale)
        correction = None
        if ctx.exact_columns and grad_at is not None:
            correction = (grad_at.sum(dim=1), kl_log_z, logits, counted)
        dtype = compute_dtype(hidden)
        with maybe_gather_lm_head_ctx(weight, bias):
            grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
            buf = tiling.buffer(hidden.shape[0], weight.shape[0], hidden.device, dtype)
            for rows in tiling.rows(hidden.shape[0]):
                h = hidden[rows].to(dtype)
                for start, end in tiling.columns(weight.shape[0]):
                    tile = project(buf, h, weight, bias, start, end)
                    sparse = None
                    if weights is not None:
                        sparse = _SparseGrad(tile, rows, start, columns, weights, spec, correction)
                    _logprob_grad_tile(tile, rows, start, spec, targets, log_z, entropy, grad_label, grad_entropy)
                    if sparse is not None:
                        sparse.add_to(tile)
                    grads.add(tile, h, rows, start, end)
        return (*grads.result(), None, None, None, None, None)


class _ExactKLHead(torch.autograd.Function):
    """`_TopKHead`'s outputs plus the exact KL(π_θ‖π_ref). The label log-prob, entropy and top-k
    come from the policy's tile in the compute dtype, exactly as TRL's head computes them (so TRL's
    importance ratio is 1 on-policy, whatever the estimator); the KL folds an fp32 policy tile and
    an fp32 reference tile over the same columns (TRL's chunked-divergence projection), so bf16
    rounding of each logit does not swamp it. In fp32 the two policy tiles are one."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        ref_hidden,
        ref_weight,
        ref_bias,
        spec: HeadSpec,
        ref_spec: HeadSpec,
        top_k: int,
        tiling: Tiling,
        top_k_vocab: int | None,
    ):
        ctx.set_materialize_grads(False)
        n, device = hidden.shape[0], hidden.device
        dtype, ref_dtype = compute_dtype(hidden), compute_dtype(ref_hidden)
        lse = LogSumExp(n, device)  # the policy's tile in the compute dtype, as TRL's head: label, entropy
        stats = PairStats(n, device)  # both heads' tiles in fp32: the exact KL
        top = RunningTopK(n, top_k, device, top_k_vocab)
        # in fp32 the compute-dtype tile is already the fp32 product
        exact_products = dtype != torch.float32
        with maybe_gather_lm_head_ctx(weight, bias, ref_weight, ref_bias):
            c_buf = tiling.buffer(n, weight.shape[0], device, dtype)
            s_buf = tiling.buffer(n, weight.shape[0], device, torch.float32) if exact_products else None
            t_buf = tiling.buffer(n, weight.shape[0], device, torch.float32)
            for rows in tiling.rows(n):
                h, h_ref = hidden[rows].to(dtype), ref_hidden[rows].to(ref_dtype)
                for start, end in tiling.columns(weight.shape[0]):
                    tile = project(c_buf, h, weight, bias, start, end)
                    lse.fold(tile, rows, targets[rows], start, spec, entropy=True)
                    if top_k:
                        top.merge(tile, rows, start, tiling.block)
                    s_tile = project_exact(s_buf, h, weight, bias, start, end, dtype) if exact_products else tile
                    t_tile = project_exact(t_buf, h_ref, ref_weight, ref_bias, start, end, ref_dtype)
                    stats.fold(s_tile, t_tile, rows, spec, ref_spec)
            log_z = lse.log_z()
            cols = _KLColumns.of(hidden, weight, bias, spec, top, lse, targets, log_z, dtype)
        entropy = lse.entropy(log_z)
        # the fp32 statistics the KL and the backward (which recomputes fp32 tiles) use
        exact_log_z, ref_log_z = stats.policy.log_z(), stats.ref.log_z()
        exact_entropy = stats.policy.entropy(exact_log_z)
        kl = stats.exact_kl(exact_log_z, ref_log_z)
        at = cols.logprobs()
        ctx.save_for_backward(
            hidden,
            weight,
            bias,
            targets,
            ref_hidden,
            ref_weight,
            ref_bias,
            exact_log_z,
            exact_entropy,
            ref_log_z,
            kl,
            cols.indices,
        )
        ctx.specs, ctx.tiling = (spec, ref_spec), tiling
        ctx.mark_non_differentiable(top.indices, log_z)
        return lse.target_logit - log_z, entropy, at[:, :top_k], top.indices, log_z, at[:, top_k], kl

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, grad_topk, _indices, _log_z, grad_sampled, grad_kl):
        (hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, log_z, entropy, ref_log_z, kl, columns) = (
            ctx.saved_tensors
        )
        (spec, ref_spec), tiling = ctx.specs, ctx.tiling
        # the backward's fp32 tiles are the exact logits: the A log-probs' gradient is that of the
        # exact softmax, whose normaliser the fp32 statistics hold
        grad_at = _grad_at(grad_topk, grad_sampled, columns.shape[0], columns.shape[1] - 1, hidden.device)
        grad_label = _dense_label_grad(grad_logprob, grad_at)
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grad_kl = None if grad_kl is None else grad_kl.float().contiguous()
        has_logprob_terms = grad_label is not None or grad_entropy is not None
        if not has_logprob_terms and grad_kl is None:
            return (None,) * 12
        shift = _kl_kernel_shift(kl, grad_kl, grad_label, grad_entropy)
        weights = _sparse_weights(columns, grad_logprob, grad_at, label_in_kernel=shift is None)
        # both kernels overwrite their tile with a gradient: when both run, the log-prob terms go to a copy
        two_kernels = shift is None and grad_kl is not None and has_logprob_terms
        n, device = hidden.shape[0], hidden.device
        dtype, ref_dtype = compute_dtype(hidden), compute_dtype(ref_hidden)
        with maybe_gather_lm_head_ctx(weight, bias, ref_weight, ref_bias):
            grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
            s_buf = tiling.buffer(n, weight.shape[0], device, torch.float32)
            t_buf = None if grad_kl is None else tiling.buffer(n, weight.shape[0], device, torch.float32)
            c_buf = tiling.buffer(n, weight.shape[0], device, torch.float32) if two_kernels else None
            for rows in tiling.rows(n):
                h, h_ref = hidden[rows].to(dtype), ref_hidden[rows].to(ref_dtype)
                for start, end in tiling.columns(weight.shape[0]):
                    s_tile = project_exact(s_buf, h, weight, bias, start, end, dtype)
                    sparse = None if weights is None else _SparseGrad(s_tile, rows, start, columns, weights, spec)
                    logprob_tile = s_tile
                    if two_kernels:
                        logprob_tile = c_buf[: h.shape[0], : end - start]
                        logprob_tile.copy_(s_tile)
                    if grad_kl is not None:
                        t_tile = project_exact(t_buf, h_ref, ref_weight, ref_bias, start, end, ref_dtype)
                        backward_pair_tile(
                            s_tile,
                            t_tile,
                            log_z[rows],
                            ref_log_z[rows],
                            (kl if shift is None else shift)[rows],
                            grad_kl[rows],
                            spec,
                            ref_spec,
                        )
                    if shift is None and has_logprob_terms:
                        _logprob_grad_tile(
                            logprob_tile, rows, start, spec, targets, log_z, entropy, grad_label, grad_entropy
                        )
                        if logprob_tile is not s_tile:
                            s_tile.add_(logprob_tile)
                    if sparse is not None:
                        sparse.add_to(s_tile)
                    grads.add(s_tile.to(dtype), h, rows, start, end)
        return (*grads.result(), *(None,) * 9)

"""The seam into TRL's fused LM head.

TRL's `add_fused_lm_head` patches a model so that `model(..., labels=..., fused_lm_head=True)`
runs the backbone, finds the head's logit scale and softcap, gathers a ZeRO-3/FSDP head, and
calls `trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, ...)` on
the scored rows. That global is looked up at call time, so for the duration of one TRL call we
put a head of ours in its place: TRL keeps doing all of the above, and our head returns what TRL
expects (label log-prob, entropy) while recording what the KL term needs. Each head here records
one row-layout result per call; `PolicyForward.laid_out` turns them into `[batch, completion_len]`
tensors like TRL's log-probs. `tests/test_trl_seams.py` fails if this seam moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
import trl.trainer.utils as trl_utils
from trl.kernels import ChunkedLogProbFunction

from .kernels import HeadSpec, RefHead, Tiling, policy_head, reference_logprobs
from .kernels.trl_tiles import compute_dtype, use_triton

_UNSUPPORTED_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")


@contextmanager
def replace_head_kernel(head: object) -> Iterator[None]:
    """Make TRL's fused forward call `head.apply(...)` instead of its log-prob kernel."""
    original = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = head
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = original


class KernelStandIn:
    """What TRL's fused forward calls in its kernel's place: `apply` takes TRL's kernel arguments
    and returns its five outputs (log-probs, entropy, and three statistics we never compute); a
    subclass's `run` gets them as a `HeadSpec` and a `Tiling` and returns (log-probs, entropy)."""

    def apply(
        self,
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        softcap=None,
        logit_scale=1.0,
        outputs=("log_probs",),
    ):
        asked = [name for name in outputs if name in _UNSUPPORTED_OUTPUTS]
        if asked:
            raise NotImplementedError(f"The TIKE head computes log_probs and entropy only, not {asked}.")
        spec = HeadSpec(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
        logprob, entropy = self.run(hidden, weight, bias, targets, spec, Tiling(vocab=chunk_size))
        return logprob, (entropy if "entropy" in outputs else None), None, None, None

    def run(self, hidden, weight, bias, targets, spec: HeadSpec, tiling: Tiling) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@dataclass
class ReferenceCapture(KernelStandIn):
    """Stands in for TRL's kernel during a reference forward: keeps the reference head's inputs
    (the scored rows' hidden states, its weight, bias and logit transform) and computes nothing."""

    heads: list[RefHead] = field(default_factory=list)

    def run(self, hidden, weight, bias, targets, spec: HeadSpec, tiling: Tiling) -> tuple[torch.Tensor, torch.Tensor]:
        # in the dtype the head projects in: the same numbers, and no more bytes than needed when kept
        hidden = hidden.detach().to(compute_dtype(hidden))
        self.heads.append(RefHead(hidden, weight, bias, spec))
        zeros = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        return zeros, zeros


@dataclass
class HeadRows:
    """What one head call produced, per scored row in TRL's row layout. Log-probs are float32;
    `logprob` is the label's, the one TRL's policy-gradient loss reads."""

    logprob: torch.Tensor  # [rows] log p(label), differentiable
    entropy: torch.Tensor | None = None  # [rows]
    topk_logprobs: torch.Tensor | None = None  # [rows, k] log p at the top-k set S, differentiable
    topk_indices: torch.Tensor | None = None  # [rows, k]
    sampled_logprob: torch.Tensor | None = None  # [rows] log p(label) as the KL reads it, differentiable
    ref_topk_logprobs: torch.Tensor | None = None  # [rows, k] log q at S
    ref_logprob: torch.Tensor | None = None  # [rows] log q(label)
    exact_kl: torch.Tensor | None = None  # [rows] Σ_v p_v ℓ_v, differentiable


@dataclass
class LogProbRecorder:
    """TRL's own log-prob kernel, recording its label log-probs: the capture for the estimators
    that read only the sampled token (k1, k2, k3)."""

    rows: list[HeadRows] = field(default_factory=list)

    def apply(self, hidden, weight, bias, targets, *args, **kwargs):
        out = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, *args, **kwargs)
        self.rows.append(HeadRows(logprob=out[0], entropy=out[1]))
        return out


@dataclass
class TIKEHead(KernelStandIn):
    """Stands in for TRL's kernel during the policy forward of the loss: one pass over the policy
    head (label log-prob, entropy, top-k, and the exact KL when `exact_kl`), then log π_ref at the
    top-k and the label from the captured reference head, recorded per call in `rows`."""

    refs: list[RefHead]
    top_k: int
    exact_kl: bool
    top_k_vocab: int | None = None
    rows: list[HeadRows] = field(default_factory=list)

    def run(self, hidden, weight, bias, targets, spec: HeadSpec, tiling: Tiling) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.rows) >= len(self.refs):
            raise RuntimeError("More policy head calls than captured reference heads: the forwards are misaligned.")
        rows = self.evaluate(hidden, weight, bias, targets, spec, self.refs[len(self.rows)], tiling)
        self.rows.append(rows)
        return rows.logprob, rows.entropy

    def evaluate(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        spec: HeadSpec,
        ref: RefHead,
        tiling: Tiling,
    ) -> HeadRows:
        """The policy head's outputs on these rows, and log π_ref at the top-k and the label (the
        benchmarks override this with a dense head)."""
        out = policy_head(
            hidden, weight, bias, targets, spec, self.top_k, ref if self.exact_kl else None, tiling, self.top_k_vocab
        )
        rows = HeadRows(logprob=out.logprob, entropy=out.entropy, exact_kl=out.exact_kl)
        if self.top_k:
            indices = torch.cat([out.topk_indices, targets.unsqueeze(1)], dim=1)
            ref_logprobs = reference_logprobs(ref.hidden, ref.weight, ref.bias, indices, ref.spec, tiling)
            rows.topk_logprobs, rows.topk_indices = out.topk_logprobs, out.topk_indices
            rows.sampled_logprob = out.sampled_logprob
            rows.ref_topk_logprobs, rows.ref_logprob = ref_logprobs[:, :-1], ref_logprobs[:, -1]
        return rows


@dataclass
class PolicyForward:
    """The loss's policy forward, laid out `[batch, completion_len, ...]` like TRL's log-probs
    (zeros at padding). `logps` is TRL's label log-prob, what its policy-gradient loss reads;
    `sampled_logprob` is the same log-prob as the KL reads it (exact in bf16); the other fields are
    None unless the head computed them (see `HeadRows`)."""

    logps: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    sampled_logprob: torch.Tensor | None = None
    ref_topk_logprobs: torch.Tensor | None = None
    ref_logprob: torch.Tensor | None = None
    exact_kl: torch.Tensor | None = None

    @staticmethod
    def laid_out(rows: list[HeadRows], attention_mask: torch.Tensor, logits_to_keep: int) -> PolicyForward:
        """One head call's rows (TRL's loss scores the micro-batch in one forward) as a PolicyForward."""
        if len(rows) != 1:
            raise RuntimeError(f"TRL's loss made {len(rows)} policy head calls, not 1: the seam moved.")
        values = {f.name: getattr(rows[0], f.name) for f in fields(PolicyForward) if f.name != "logps"}
        return PolicyForward(
            logps=rows_to_completion(rows[0].logprob, attention_mask, logits_to_keep),
            **{
                name: None if value is None else rows_to_completion(value, attention_mask, logits_to_keep)
                for name, value in values.items()
            },
        )


def completion_to_rows(values: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """The inverse of `rows_to_completion`: per-completion-position values ([batch, logits_to_keep,
    ...]) in the row layout TRL's fused head scores on this device (zeros at the positions that
    carry no completion token)."""
    batch, seq = attention_mask.shape
    keep = attention_mask[:, -logits_to_keep:].bool()
    if use_triton(values.device):  # TRL scores only the labelled positions, in row-major order
        return values[keep]
    rows = values.new_zeros((batch, seq - 1, *values.shape[2:]))
    rows[:, -logits_to_keep:] = torch.where(keep.view(*keep.shape, *(1,) * (values.dim() - 2)), values, 0)
    return rows.flatten(0, 1)


def rows_to_completion(rows: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Lay per-row head results ([rows, ...]) out as [batch, logits_to_keep, ...] like TRL does.

    TRL's fused head scores either every shifted position (rows = batch·(seq−1), on devices
    without Triton) or only the labelled ones in row-major order (rows = number of completion
    tokens); the completion positions are the last `logits_to_keep` of the shifted sequence.
    """
    batch, seq = attention_mask.shape
    keep = attention_mask[:, -logits_to_keep:].bool()
    if rows.shape[0] == batch * (seq - 1):
        laid_out = rows.view(batch, seq - 1, *rows.shape[1:])[:, -logits_to_keep:]
        return torch.where(keep.view(*keep.shape, *(1,) * (rows.dim() - 1)), laid_out, 0)
    if rows.shape[0] == int(keep.sum()):
        out = rows.new_zeros((batch, logits_to_keep, *rows.shape[1:]))
        out[keep] = rows
        return out
    raise RuntimeError(
        f"TRL's fused head scored {rows.shape[0]} rows, neither every position ({batch * (seq - 1)}) nor the "
        f"completion tokens ({int(keep.sum())}): its layout changed; check the supported TRL version."
    )

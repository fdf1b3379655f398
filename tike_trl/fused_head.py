"""The seam into TRL's fused LM head.

TRL's `add_fused_lm_head` patches a model so that `model(..., labels=..., fused_lm_head=True)`
runs the backbone, finds the head's logit scale and softcap, gathers a ZeRO-3/FSDP head, and
calls `trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, ...)` on
the scored rows. That global is looked up at call time, so for the duration of one call we put
our own head in its place: TRL keeps doing all of the above, and our head returns what TRL
expects (label log-prob, entropy) while keeping what TIKE needs (top-k, reference log-probs,
exact KL) for the trainer. `tests/test_trl_seams.py` fails if this seam moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import trl.trainer.utils as trl_utils

from .kernels import HeadOutputs, HeadSpec, RefHead, Tiling, policy_head, reference_logprobs

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


def _spec(temperature: float, softcap: float | None, logit_scale: float) -> HeadSpec:
    return HeadSpec(temperature=temperature, logit_scale=logit_scale, softcap=softcap)


def _check_outputs(outputs: tuple[str, ...]) -> None:
    asked = [name for name in outputs if name in _UNSUPPORTED_OUTPUTS]
    if asked:
        raise NotImplementedError(f"The TIKE head computes log_probs and entropy only, not {asked}.")


@dataclass
class ReferenceCapture:
    """Stands in for TRL's kernel during a reference forward: keeps the reference head's inputs
    (the scored rows' hidden states, its weight, bias and logit transform) and computes nothing."""

    heads: list[RefHead] = field(default_factory=list)

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
        _check_outputs(outputs)
        self.heads.append(RefHead(hidden.detach(), weight, bias, _spec(temperature, softcap, logit_scale)))
        zeros = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        return zeros, (zeros if "entropy" in outputs else None), None, None, None


@dataclass
class TIKEHead:
    """Stands in for TRL's kernel during the policy forward of the loss: one pass over the policy
    head (label log-prob, entropy, top-k, and the exact KL when `exact_kl`), then log π_ref at the
    top-k and the label from the captured reference head."""

    refs: list[RefHead]
    top_k: int
    exact_kl: bool
    top_k_vocab: int | None = None
    results: list[tuple[HeadOutputs, torch.Tensor | None]] = field(default_factory=list)

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
        _check_outputs(outputs)
        if len(self.results) >= len(self.refs):
            raise RuntimeError("More policy head calls than captured reference heads: the forwards are misaligned.")
        out, ref_logprobs = self.evaluate(
            hidden,
            weight,
            bias,
            targets,
            _spec(temperature, softcap, logit_scale),
            self.refs[len(self.results)],
            Tiling(vocab=chunk_size),
        )
        self.results.append((out, ref_logprobs))
        return out.logprob, (out.entropy if "entropy" in outputs else None), None, None, None

    def evaluate(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        spec: HeadSpec,
        ref: RefHead,
        tiling: Tiling,
    ) -> tuple[HeadOutputs, torch.Tensor | None]:
        """The policy head's outputs on these rows, and log π_ref at [top-k, label] (None without top-k)."""
        out = policy_head(
            hidden, weight, bias, targets, spec, self.top_k, ref if self.exact_kl else None, tiling, self.top_k_vocab
        )
        if not self.top_k:
            return out, None
        indices = torch.cat([out.topk_indices, targets.unsqueeze(1)], dim=1)
        return out, reference_logprobs(ref.hidden, ref.weight, ref.bias, indices, ref.spec, tiling)


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

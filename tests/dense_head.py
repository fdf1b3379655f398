"""The naive, dense LM head: both models' `[rows, vocab]` logits materialised, `log_softmax`, then
`topk` or the full sum (`tike_trl.estimators`' formulas), as public RB/TIKE code computes them.

It plugs into the same seam as `tike_trl.fused_head.TIKEHead` (its `evaluate`), so the trainer,
the GRPO loss and the reference forward are the real ones and only the head differs. The tests
use it as the reference the tiled head must match; the benchmarks time it as the naive variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tike_trl import TIKEGRPOTrainer
from tike_trl.estimators import exact_kl
from tike_trl.fused_head import HeadRows, TIKEHead
from tike_trl.kernels import HeadSpec, RefHead, Tiling


def dense_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: HeadSpec
) -> torch.Tensor:
    """log_softmax of the full `[rows, vocab]` logits, as code reading `model(...).logits` computes it."""
    return F.log_softmax(spec.transform(F.linear(hidden, weight, bias)), dim=-1)


class DenseHead(TIKEHead):
    """The naive head: every tensor is `[rows, vocab]`; outputs identical to `TIKEHead`'s."""

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
        label = targets[:, None]
        logp = dense_log_softmax(hidden, weight, bias, spec)
        with torch.no_grad():
            logq = dense_log_softmax(ref.hidden, ref.weight, ref.bias, ref.spec)
        rows = HeadRows(
            logprob=logp.gather(1, label).squeeze(1),
            entropy=-(logp.exp() * logp).sum(-1),
            exact_kl=exact_kl(logp, logq) if self.exact_kl else None,
        )
        if self.top_k:
            rows.topk_logprobs, rows.topk_indices = logp.topk(self.top_k, dim=-1)
            rows.ref_topk_logprobs, rows.ref_logprob = logq.gather(1, rows.topk_indices), logq.gather(1, label)[:, 0]
            rows.sampled_logprob = rows.logprob
        return rows


class DenseHeadTrainer(TIKEGRPOTrainer):
    """`TIKEGRPOTrainer` with the naive head in place of the tiled one."""

    def _loss_head(self, refs: list[RefHead]) -> TIKEHead:
        head = super()._loss_head(refs)
        return DenseHead(head.refs, head.top_k, head.exact_kl)

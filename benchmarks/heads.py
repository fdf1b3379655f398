"""Stand-ins for the LM head that the benchmark compares our tiled head with.

Both plug into the same seam as `tike_trl.fused_head.TIKEHead` (TRL's fused forward calls
`head.apply(...)`), so the trainer, the GRPO loss and the reference forward are the real ones and
only the head differs:

- `DenseHead`: the naive head that public RB/TIKE code uses: both models' `[rows, vocab]` logits
  materialised, `log_softmax`, then `topk` or the full sum (`tike_trl.estimators`' formulas).
- `NoHead`: no head at all, only a differentiable zero from the hidden states, so that a step
  run with it costs what the backbones cost. "Head extra memory" is measured against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tike_trl import TIKEGRPOTrainer
from tike_trl.estimators import exact_kl
from tike_trl.fused_head import TIKEHead
from tike_trl.kernels import HeadOutputs, HeadSpec, RefHead, Tiling


def dense_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: HeadSpec, label: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax of the full `[rows, vocab]` logits, as code reading `model(...).logits` computes
    it, and log Z (from the label's column; the logits are freed on return)."""
    logits = spec.transform(F.linear(hidden, weight, bias))
    logp = F.log_softmax(logits, dim=-1)
    return logp, (logits.gather(1, label) - logp.gather(1, label)).squeeze(1).detach()


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
    ) -> tuple[HeadOutputs, torch.Tensor | None]:
        label = targets[:, None]
        logp, log_z = dense_log_softmax(hidden, weight, bias, spec, label)
        with torch.no_grad():
            logq, _ = dense_log_softmax(ref.hidden, ref.weight, ref.bias, ref.spec, label)
        topk_logprobs, topk_indices = logp.topk(self.top_k, dim=-1)  # k = 0 (rb): empty
        out = HeadOutputs(
            logprob=logp.gather(1, label).squeeze(1),
            entropy=-(logp.exp() * logp).sum(-1),
            topk_logprobs=topk_logprobs,
            topk_indices=topk_indices,
            log_z=log_z,
            exact_kl=exact_kl(logp, logq) if self.exact_kl else None,
        )
        if not self.top_k:
            return out, None
        return out, logq.gather(1, torch.cat([topk_indices, label], dim=1))


class DenseHeadTrainer(TIKEGRPOTrainer):
    """`TIKEGRPOTrainer` with the naive head in place of the tiled one, for the `naive` variants."""

    def _loss_head(self, refs: list[RefHead]) -> TIKEHead:
        head = super()._loss_head(refs)
        return DenseHead(head.refs, head.top_k, head.exact_kl)


class NoHead:
    """Stands in for TRL's head kernel (`replace_head_kernel(NoHead())`): a zero log-prob (and
    entropy) per row that still depends on the hidden states, so the backbone's backward runs."""

    @staticmethod
    def apply(
        hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=("log_probs",)
    ):
        zero = hidden.sum(-1, dtype=torch.float32) * 0.0
        return zero, (zero.clone() if "entropy" in outputs else None), None, None, None

"""The no-head stand-in the benchmark measures the heads against (the naive dense head lives in
`tests/dense_head.py`, where the tests use it as the reference the tiled head must match).

`NoHead` plugs into the same seam as `tike_trl.fused_head.TIKEHead` (TRL's fused forward calls
`head.apply(...)`): only a differentiable zero from the hidden states, so that a step run with it
costs what the backbones cost. "Head extra memory" is measured against it.
"""

from __future__ import annotations

import torch

from tike_trl.fused_head import KernelStandIn


class NoHead(KernelStandIn):
    """Stands in for TRL's head kernel (`replace_head_kernel(NoHead())`): a zero log-prob (and
    entropy) per row that still depends on the hidden states, so the backbone's backward runs."""

    def run(self, hidden, weight, bias, targets, spec, tiling) -> tuple[torch.Tensor, torch.Tensor]:
        zero = hidden.sum(-1, dtype=torch.float32) * 0.0
        return zero, zero.clone()

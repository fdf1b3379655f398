"""The reference head without gradient: log π_ref at given indices, in one tiled pass.

TIKE needs log q at the policy's top-k set S and at the sampled token: the reference's log-
normaliser (an online logsumexp over every vocabulary tile) and its logits at those few columns,
recomputed exactly when the tiles are bf16 (`precise.py`).
"""

from __future__ import annotations

import torch

from .precise import corrected_log_z, exact_logits, first_occurrence, needs_exact_columns
from .tiles import Tiling, gather_columns, project
from .trl_tiles import HeadSpec, LogSumExp, compute_dtype, maybe_gather_lm_head_ctx


@torch.no_grad()
def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    spec: HeadSpec = HeadSpec(),
    tiling: Tiling = Tiling(),
) -> torch.Tensor:
    """log softmax(head(hidden))[row, indices[row]] as float32, shape of `indices` ([N, m])."""
    n, device, dtype = hidden.shape[0], hidden.device, compute_dtype(hidden)
    if indices.shape[0] != n:
        raise ValueError(f"indices has {indices.shape[0]} rows, hidden has {n}.")
    lse = LogSumExp(n, device)
    raw = torch.zeros(indices.shape, device=device, dtype=torch.float32)
    with maybe_gather_lm_head_ctx(weight, bias):
        buf = tiling.buffer(n, weight.shape[0], device, dtype)
        for rows in tiling.rows(n):
            h = hidden[rows].to(dtype)
            for start, end in tiling.columns(weight.shape[0]):
                tile = project(buf, h, weight, bias, start, end)
                # TRL's Triton fold reads one contiguous target per row (its label logit is unused here)
                lse.fold(tile, rows, indices[rows, 0].contiguous(), start, spec, entropy=False)
                values, in_tile, _ = gather_columns(tile, indices[rows], start)
                raw[rows] = torch.where(in_tile, values.float(), raw[rows])
        rounded, log_z = spec.transform(raw), lse.log_z()
        if needs_exact_columns(dtype):  # bf16 tiles: exact logits at the columns, and their normaliser
            exact = exact_logits(hidden, weight, bias, spec, indices, dtype)
            return exact - corrected_log_z(log_z, rounded, exact, first_occurrence(indices)).unsqueeze(1)
    return rounded - log_z.unsqueeze(1)

"""fp32 logits at a few columns, and each normaliser with those columns' rounding undone.

The heads project each tile in the compute dtype, as TRL's head does. In bf16 that rounds each
logit by ~0.03-0.06 at |logit| 20-30, which swamps a per-token KL of 1e-3. TIKE reads log p and
log q at only k + 1 columns per row (the top-k set S and the sampled token), so those logits are
recomputed as fp32 dot products of the same bf16 operands (O(k·d) per row, no second GEMM over
the vocabulary), and each head's log-normaliser trades those columns' rounded exponentials for
the exact ones: log Z* = log(Σ_{v∉A} e^{z_v} + Σ_{v∈A} e^{z*_v}). What is left is the rounding of
the tail's logits, which hold little mass.
"""

from __future__ import annotations

import torch

from .tiles import MASKED_LOGIT
from .trl_tiles import HeadSpec

# elements of the gathered weight rows held at once (64 MiB in fp32)
GATHER_BUDGET = 1 << 24


def needs_exact_columns(dtype: torch.dtype) -> bool:
    """Whether the tiles round logits (bf16, fp16): in fp32 the tile values are already exact."""
    return dtype not in (torch.float32, torch.float64)


def exact_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: HeadSpec,
    columns: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Logits at `columns` ([n, m]) from fp32 dot products of the `dtype` operands (the bf16 hidden
    states and weight rows the tiles multiply, without rounding the product), float32."""
    n, m = columns.shape
    out = torch.empty((n, m), device=hidden.device, dtype=torch.float32)
    step = max(1, GATHER_BUDGET // max(1, m * hidden.shape[1]))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        w = weight[columns[rows]].to(dtype).float()  # [rows, m, d]
        raw = torch.einsum("rmd,rd->rm", w, hidden[rows].to(dtype).float())
        if bias is not None:
            raw = raw + bias[columns[rows]].float().clamp(min=MASKED_LOGIT)
        out[rows] = spec.transform(raw)
    return out


def first_occurrence(columns: torch.Tensor) -> torch.Tensor:
    """True where a column ([n, m]) is not a repeat of one earlier in its row (the sampled token
    may also be in the top-k set; the normaliser counts it once)."""
    ordered, order = columns.sort(dim=1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return ~torch.zeros_like(repeat).scatter(1, order, repeat)


def corrected_log_z(
    log_z: torch.Tensor, rounded: torch.Tensor, exact: torch.Tensor, counted: torch.Tensor
) -> torch.Tensor:
    """log Z* from the compute-dtype `log_z` ([n]): the `counted` columns' rounded logits
    ([n, m]) replaced by their `exact` ones."""
    shift = log_z.unsqueeze(1)
    swap = torch.where(counted, torch.exp(exact - shift) - torch.exp(rounded - shift), 0.0)
    return log_z + torch.log1p(swap.sum(1))

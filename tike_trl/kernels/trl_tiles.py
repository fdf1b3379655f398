"""The per-tile kernels we borrow from TRL 1.16, behind one seam.

TRL's fused LM head (`trl.kernels.chunked_logprob`) and chunked divergence
(`trl.kernels.chunked_divergence`) fold one `[tokens, vocab_chunk]` tile at a time: a Triton
program per token on CUDA/XPU, torch ops elsewhere. We call the same folds, dispatched the same
way, so our heads cost what TRL's head costs plus only the top-k work. These names are private
to TRL: `tests/test_trl_seams.py` fails loudly if one moves, and pyproject pins the TRL range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from trl.kernels import chunked_divergence as _div
from trl.kernels import chunked_logprob as _lp
from trl.trainer.utils import maybe_gather_lm_head_ctx

TOKEN_CHUNK_SIZE = _lp.TOKEN_CHUNK_SIZE
VOCAB_CHUNK_SIZE = _div.VOCAB_CHUNK_SIZE
addmm_fp32 = _lp._addmm_fp32
use_triton = _lp._use_triton
project_fp32 = _div._project

__all__ = [
    "HeadSpec",
    "LogSumExp",
    "PairStats",
    "TOKEN_CHUNK_SIZE",
    "VOCAB_CHUNK_SIZE",
    "addmm_fp32",
    "backward_logprob_tile",
    "backward_pair_tile",
    "compute_dtype",
    "maybe_gather_lm_head_ctx",
    "project_fp32",
    "use_triton",
]


@dataclass(frozen=True)
class HeadSpec:
    """How a head's projection becomes logits, as TRL's fused head applies it:
    z = softcap·tanh(scale·y / softcap) / temperature (no tanh without a softcap)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale={self.logit_scale} must be > 0 (top-k assumes an increasing transform).")

    def kernel_args(self, prefix: str = "") -> dict:
        """Keyword arguments of TRL's tile kernels; prefix "s_"/"t_" for the divergence kernels."""
        cap = "S_" if prefix == "s_" else "T_" if prefix == "t_" else ""
        scale_key = f"{prefix}scale" if prefix else "logit_scale"
        return {
            scale_key: self.logit_scale,
            f"{prefix}softcap": self.softcap or 1.0,
            f"{cap}HAS_SOFTCAP": self.softcap is not None,
        }

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """Logits from raw projection values (fp32), elementwise, like TRL's `_torch_transform`."""
        return _lp._torch_transform(
            raw.float(), self.logit_scale, self.softcap or 1.0, 1 / self.temperature, self.softcap is not None
        )

    def dlogit_draw(self, raw: torch.Tensor) -> torch.Tensor:
        """dz/dy at raw projection values y, the chain factor of the backward."""
        factor = self.logit_scale / self.temperature
        if self.softcap is None:
            return torch.full_like(raw, factor, dtype=torch.float32)
        t = torch.tanh(raw.float() * self.logit_scale / self.softcap)
        return factor * (1 - t * t)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype TRL's head projects in: autocast's when enabled, else the hidden states'."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


class LogSumExp:
    """Online logsumexp, entropy and label-logit statistics of N rows, folded tile by tile with
    TRL's `chunked_logprob` forward kernel."""

    def __init__(self, n: int, device: torch.device) -> None:
        def full(value: float) -> torch.Tensor:
            return torch.full((n,), value, device=device, dtype=torch.float32)

        self.max, self.sum_exp, self.x_sum_exp, self.target_logit = full(-math.inf), full(0), full(0), full(0)
        # statistics TRL's kernel can also gather (sum of squares, logit sum, top-1); never requested
        self._unused = full(0)

    def fold(
        self, tile: torch.Tensor, rows: slice, targets: torch.Tensor, vocab_start: int, spec: HeadSpec, entropy: bool
    ) -> None:
        n = tile.shape[0]
        fold = _lp._forward_kernel[(n,)] if use_triton(tile.device) else _lp._forward_tile
        fold(
            tile,
            tile.stride(0),
            targets,
            self.max[rows],
            self.sum_exp[rows],
            self.x_sum_exp[rows],
            self._unused[rows],
            self._unused[rows],
            self._unused[rows],
            self.target_logit[rows],
            vocab_start,
            tile.shape[1],
            inv_t=1 / spec.temperature,
            HAS_ENTROPY=entropy,
            HAS_LOG_SUM_SQ_PROBS=False,
            HAS_MEAN_LOGITS=False,
            HAS_IS_TOP1=False,
            BLOCK_SIZE=_lp._BLOCK_SIZE,
            **spec.kernel_args(),
        )

    def log_z(self) -> torch.Tensor:
        return self.max + torch.log(self.sum_exp)

    def entropy(self, log_z: torch.Tensor) -> torch.Tensor:
        return log_z - self.x_sum_exp / self.sum_exp


class PairStats:
    """Joint statistics of a policy tile and a reference tile over the same vocabulary columns,
    folded with TRL's `chunked_divergence` stats kernel: the policy's logsumexp and entropy, the
    reference's logsumexp, and Σ_v exp(z_v − m)(z_v − y_v) for the exact KL(π_θ‖π_ref)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.policy = LogSumExp(n, device)
        self.ref = LogSumExp(n, device)
        self.ref_gap = torch.zeros((n,), device=device, dtype=torch.float32)
        self.policy_gap = torch.zeros((n,), device=device, dtype=torch.float32)

    def fold(
        self, s_tile: torch.Tensor, t_tile: torch.Tensor, rows: slice, spec: HeadSpec, ref_spec: HeadSpec
    ) -> None:
        n = s_tile.shape[0]
        fold = _div._stats_kernel[(n,)] if use_triton(s_tile.device) else _div._stats_tile
        p, r = self.policy, self.ref
        fold(
            s_tile,
            s_tile.stride(0),
            t_tile,
            t_tile.stride(0),
            p.max[rows],
            p.sum_exp[rows],
            p.x_sum_exp[rows],
            r.max[rows],
            r.sum_exp[rows],
            self.ref_gap[rows],
            self.policy_gap[rows],
            s_tile.shape[1],
            inv_t=1 / spec.temperature,
            BLOCK_SIZE=_lp._BLOCK_SIZE,
            **spec.kernel_args("s_"),
            **ref_spec.kernel_args("t_"),
        )

    def exact_kl(self, log_z: torch.Tensor, ref_log_z: torch.Tensor) -> torch.Tensor:
        """D = Σ p (z − y) − log Z_p + log Z_q, TRL's reverse-KL (beta=1) closing formula."""
        return self.policy_gap / self.policy.sum_exp - log_z + ref_log_z


def backward_logprob_tile(
    tile: torch.Tensor,
    targets: torch.Tensor,
    log_z: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    vocab_start: int,
    spec: HeadSpec,
) -> None:
    """Overwrite `tile` (raw projections) with d(loss)/d(projection) for the label log-prob term
    g·(1[j=o] − p_j) and the entropy term, with TRL's `chunked_logprob` backward kernel."""
    n, cols = tile.shape
    if use_triton(tile.device):
        fold = _lp._backward_kernel[(n, math.ceil(cols / _lp._BLOCK_SIZE))]
    else:
        fold = _lp._backward_tile
    fold(
        tile,
        tile.stride(0),
        targets,
        log_z,
        log_z if entropy is None else entropy,
        log_z if grad_logprob is None else grad_logprob,
        log_z if grad_entropy is None else grad_entropy,
        vocab_start,
        cols,
        inv_t=1 / spec.temperature,
        HAS_LOGPROB_GRAD=grad_logprob is not None,
        HAS_ENTROPY_GRAD=grad_entropy is not None,
        BLOCK_SIZE=_lp._BLOCK_SIZE,
        **spec.kernel_args(),
    )


def backward_pair_tile(
    s_tile: torch.Tensor,
    t_tile: torch.Tensor,
    log_z: torch.Tensor,
    ref_log_z: torch.Tensor,
    kl: torch.Tensor,
    grad_kl: torch.Tensor,
    spec: HeadSpec,
    ref_spec: HeadSpec,
) -> None:
    """Overwrite `s_tile` with dD/d(projection) = g·p_j(ℓ_j − D)·dz/dy, TRL's divergence backward
    kernel in its KL(student‖teacher) mode."""
    n, cols = s_tile.shape
    if use_triton(s_tile.device):
        fold = _div._backward_kernel[(n, math.ceil(cols / _lp._BLOCK_SIZE))]
    else:
        fold = _div._backward_tile
    fold(
        s_tile,
        s_tile.stride(0),
        t_tile,
        t_tile.stride(0),
        log_z,
        ref_log_z,
        kl,
        grad_kl,
        cols,
        1.0,
        inv_t=1 / spec.temperature,
        MODE=1,
        BLOCK_SIZE=_lp._BLOCK_SIZE,
        **spec.kernel_args("s_"),
        **ref_spec.kernel_args("t_"),
    )

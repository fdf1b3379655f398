"""The plumbing every tiled head shares: tile sizes, a frozen (reference) head, the projection of
one `[token_chunk, vocab_chunk]` tile, and the gather of a few vocabulary columns from a tile."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .topk import BLOCK
from .trl_tiles import TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE, HeadSpec, project_fp32

# A -inf bias (a masked, never-sampled head row) becomes this raw logit: exp() of it is exactly 0
# in fp32, as for -inf, but 0·logit stays 0 where TRL's folds would form 0·(-inf) = NaN.
MASKED_LOGIT = -1.0e4


@dataclass(frozen=True)
class Tiling:
    """Tile sizes of a pass; TRL's by default. `block` is the column block of the top-k select.
    `pair_tokens` is the token rows of the exact-KL head's tiles, which are fp32 and come in pairs
    (policy and reference): a quarter of TRL's rows keeps the pair at the bytes of TRL's bf16 tile."""

    tokens: int = TOKEN_CHUNK_SIZE
    vocab: int = VOCAB_CHUNK_SIZE
    block: int = BLOCK
    pair_tokens: int = TOKEN_CHUNK_SIZE // 4

    def rows(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.tokens):
            yield slice(start, min(start + self.tokens, n))

    def columns(self, vocab: int) -> Iterator[tuple[int, int]]:
        for start in range(0, vocab, self.vocab):
            yield start, min(start + self.vocab, vocab)

    def buffer(self, n: int, vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One tile's storage, reused across the pass (no wider than the vocabulary)."""
        return torch.empty((min(n, self.tokens), min(vocab, self.vocab)), device=device, dtype=dtype)


@dataclass(frozen=True)
class RefHead:
    """A frozen head: hidden states [N, d_ref] aligned row by row with the policy's, its weight and bias."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    spec: HeadSpec = HeadSpec()


def head_rows(weight: torch.Tensor) -> int:
    """Vocabulary rows of a head weight, also while ZeRO-3 holds it partitioned (gathered later, in the tiles)."""
    return getattr(weight, "ds_shape", weight.shape)[0]


def _add_bias(tile: torch.Tensor, bias: torch.Tensor | None, start: int, end: int) -> None:
    if bias is not None:
        tile.add_(bias[start:end].to(tile.dtype).clamp(min=MASKED_LOGIT))


def project(
    buf: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, end: int
) -> torch.Tensor:
    """hidden @ weight[start:end].T (+ bias) into a view of `buf`, in `buf`'s dtype, like TRL's head."""
    tile = buf[: hidden.shape[0], : end - start]
    torch.mm(hidden, weight[start:end].to(buf.dtype).t(), out=tile)
    _add_bias(tile, bias, start, end)
    return tile


def project_exact(
    buf: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    start: int,
    end: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The same into an fp32 `buf` from `dtype` operands, without rounding the product to `dtype`
    (TRL's divergence projection)."""
    tile = buf[: hidden.shape[0], : end - start]
    project_fp32(tile, hidden, weight, None, start, end, dtype)
    _add_bias(tile, bias, start, end)
    return tile


def gather_columns(
    tile: torch.Tensor, columns: torch.Tensor, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values of `tile` (vocabulary columns [vocab_start, vocab_start + width)) at the global
    `columns` ([n, m]), where each falls in the tile (bool [n, m]), and the tile-local column
    index (clamped into the tile where it does not). Values outside the tile are meaningless."""
    local = columns - vocab_start
    in_tile = (local >= 0) & (local < tile.shape[1])
    local = local.clamp(0, tile.shape[1] - 1)
    return tile.gather(1, local), in_tile, local

"""Exact top-k of each row of a logits tile, merged across the vocabulary tiles of a pass.

A full `topk` over a [tokens, 32768] tile is slow on GPU. Instead: the maximum of each block of
`block` columns (one read of the tile), the k blocks with the largest maxima, and the exact
top-k among their k·block columns. The true top-k lies inside those blocks: an element among the
k largest sits in a block whose maximum is at least the k-th largest value, and fewer than k
blocks can have a larger maximum. With ties the chosen set may differ from `torch.topk`'s, but
it is always *a* top-k set: every chosen value is >= every value left out. That is the promise,
and the tests check it, not torch's tie-breaking.
"""

from __future__ import annotations

import torch

BLOCK = 128


def tile_topk(tile: torch.Tensor, k: int, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, column indices) of a top-k set of each row of `tile` ([n, cols]), k <= cols, in no
    particular order (unsorted selects skip a sort of the k values)."""
    n, cols = tile.shape
    if k * block >= cols:
        return tile.topk(k, dim=1, sorted=False)
    full = cols // block * block
    block_max = tile[:, :full].unflatten(1, (full // block, block)).amax(dim=2)
    if full < cols:  # a last, partial block
        block_max = torch.cat([block_max, tile[:, full:].amax(dim=1, keepdim=True)], dim=1)
    best_blocks = block_max.topk(k, dim=1, sorted=False).indices
    columns = (best_blocks.unsqueeze(-1) * block + torch.arange(block, device=tile.device)).reshape(n, k * block)
    candidates = tile.gather(1, columns.clamp(max=cols - 1)).masked_fill(columns >= cols, float("-inf"))
    values, pos = candidates.topk(k, dim=1, sorted=False)
    # a row with fewer than k finite logits may pick padding (-inf) slots: keep their columns valid
    return values, columns.gather(1, pos).clamp(max=cols - 1)


class RunningTopK:
    """The top-k (raw projection value, vocabulary index) pairs of N rows seen so far, among the
    first `top_k_vocab` columns (a padded head's extra rows are never chosen)."""

    def __init__(self, n: int, k: int, device: torch.device, top_k_vocab: int | None = None) -> None:
        self.k, self.top_k_vocab = k, top_k_vocab
        self.values = torch.full((n, k), float("-inf"), device=device, dtype=torch.float32)
        self.indices = torch.zeros((n, k), device=device, dtype=torch.long)

    def merge(self, tile: torch.Tensor, rows: slice, vocab_start: int, block: int = BLOCK) -> None:
        if self.top_k_vocab is not None:
            if vocab_start >= self.top_k_vocab:
                return
            tile = tile[:, : self.top_k_vocab - vocab_start]
        k = min(self.k, tile.shape[1])
        values, columns = tile_topk(tile, k, block)
        all_values = torch.cat([self.values[rows], values.float()], dim=1)
        all_indices = torch.cat([self.indices[rows], columns + vocab_start], dim=1)
        best = all_values.topk(self.k, dim=1, sorted=False).indices
        self.values[rows] = all_values.gather(1, best)
        self.indices[rows] = all_indices.gather(1, best)

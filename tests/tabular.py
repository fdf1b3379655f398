"""A tabular autoregressive model small enough to enumerate: vocabulary V = 5, length T = 3, so
125 sequences. Position t's logits depend only on the previous token (row V is the start state);
the enumeration tests sum over every sequence to get exact expectations."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

V, T = 5, 3


def tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 logit tables [T, V + 1, V] of the policy (requires grad) and the reference."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(T, V + 1, V, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(T, V + 1, V, generator=g, dtype=torch.float64)
    return theta, ref


def histories(seq) -> list[int]:
    """The table row each position of `seq` reads: the start state, then the previous token."""
    return [V if t == 0 else seq[t - 1] for t in range(T)]


def seq_logprob(table: torch.Tensor, seq) -> torch.Tensor:
    """log π(seq) under a logit table."""
    return sum(F.log_softmax(table[t, h], -1)[seq[t]] for t, h in enumerate(histories(seq)))


def exact_sequence_kl(theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(π_θ‖π_ref) over whole sequences, by enumeration."""
    total = 0
    for seq in itertools.product(range(V), repeat=T):
        logp = seq_logprob(theta, seq)
        total = total + logp.exp() * (logp - seq_logprob(ref, seq))
    return total

"""A tabular autoregressive model small enough to enumerate: vocabulary V = 5, length T = 3, so
125 sequences. Position t's logits depend only on the previous token (row V is the start state);
the enumeration tests sum over every sequence to get exact expectations.

The per-sequence helpers below are the loop-free form (`SEQUENCES`, all 125 at once as one
[125, T, V] batch); `benchmarks/sequence_gradient_variance.py` uses them too."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

V, T = 5, 3
# every sequence, [V**T, T], in lexicographic order
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=T)))


def tables(seed: int = 0, near: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 logit tables [T, V + 1, V] of the policy (requires grad) and the reference;
    with `near`, the reference is the policy plus `near`·N(0, 1) noise (a policy near its reference)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(T, V + 1, V, generator=g, dtype=torch.float64)
    ref = torch.randn(T, V + 1, V, generator=g, dtype=torch.float64)
    if near is not None:
        ref = theta + near * ref
    return theta.requires_grad_(), ref


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


# ---- all sequences at once ----


def rows(seqs: torch.Tensor = SEQUENCES) -> torch.Tensor:
    """[N, T]: the table row each position reads (as `histories`, batched)."""
    return torch.cat([torch.full_like(seqs[:, :1], V), seqs[:, :-1]], 1)


def batch_logits(table: torch.Tensor, seqs: torch.Tensor = SEQUENCES) -> torch.Tensor:
    """[N, T, V]: the logits of every position of every sequence, differentiable in `table`."""
    return table[torch.arange(T), rows(seqs)]


def token_logprobs(table: torch.Tensor, seqs: torch.Tensor = SEQUENCES) -> torch.Tensor:
    """[N, T]: log π(o_t | h_t) along each sequence."""
    return F.log_softmax(batch_logits(table, seqs), -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)


def eos_mask(seqs: torch.Tensor = SEQUENCES, eos: int = 0) -> torch.Tensor:
    """[N, T] float mask of a completion that ends at its first `eos` (included, as TRL's completion
    mask includes the EOS token); positions after it are padding. Summing over all N sequences with
    the full product weight marginalises the padding, so expectations are over the ended sequences."""
    ended_before = torch.cumsum((seqs == eos).long(), 1) - (seqs == eos).long()
    return (ended_before == 0).to(torch.float64)


def sequence_kl(theta: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(π_θ(y)‖π_ref(y)) by enumeration, differentiable; with `mask` (`eos_mask`), the KL of the
    ended sequences (the padding positions' factors sum out)."""
    logp, logq = token_logprobs(theta), token_logprobs(ref)
    mask = torch.ones_like(logp) if mask is None else mask
    return (logp.sum(-1).exp() * ((logp - logq) * mask).sum(-1)).sum()


def probabilities(table: torch.Tensor, seqs: torch.Tensor = SEQUENCES) -> torch.Tensor:
    """[N]: π(y) of each sequence, without gradient (the expectation weights)."""
    return token_logprobs(table.detach(), seqs).sum(-1).exp()


def table_gradients(surrogates: torch.Tensor, logits: torch.Tensor, seqs: torch.Tensor = SEQUENCES) -> torch.Tensor:
    """[N, T·(V + 1)·V]: the gradient of each sequence's surrogate with respect to the table, from
    one backward pass. `logits` is the [N, T, V] tensor (`batch_logits`) the surrogates were
    computed from; each surrogate may read only its own row (anything shared is detached)."""
    (grad,) = torch.autograd.grad(surrogates.sum(), logits, retain_graph=True)
    n = seqs.shape[0]
    out = grad.new_zeros(n, T, V + 1, V)
    out[torch.arange(n)[:, None], torch.arange(T)[None, :], rows(seqs)] = grad
    return out.view(n, -1)


def position_gradients(
    per_position: torch.Tensor, logits: torch.Tensor, seqs: torch.Tensor = SEQUENCES
) -> torch.Tensor:
    """[N, T, T·(V + 1)·V]: the gradient of each (sequence, position) entry of `per_position`
    ([N, T]) with respect to the table, from one backward pass; entry (i, t) may read only
    `logits[i, t]` (true of per-token values and log-probs)."""
    (grad,) = torch.autograd.grad(per_position.sum(), logits, retain_graph=True)
    n = seqs.shape[0]
    out = grad.new_zeros(n, T, T, V + 1, V)
    positions = torch.arange(T)[None, :]
    out[torch.arange(n)[:, None], positions, positions, rows(seqs)] = grad
    return out.view(n, T, -1)

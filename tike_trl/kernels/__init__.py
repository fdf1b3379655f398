"""Memory-lean tiled LM-head kernels: never more than one [token_chunk, vocab_chunk] tile."""

from .policy import HeadOutputs, policy_head
from .reference import reference_logprobs
from .tiles import RefHead, Tiling, head_rows
from .trl_tiles import HeadSpec

__all__ = ["HeadOutputs", "HeadSpec", "RefHead", "Tiling", "head_rows", "policy_head", "reference_logprobs"]

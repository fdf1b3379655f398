"""Tiny models, tokenizers and datasets built locally, for tests (no Hub access)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    ["<pad>", "<eos>", "<unk>"]
    + [str(i) for i in range(10)]
    + [
        "+",
        "-",
        "=",
        "?",
        "what",
        "is",
        "the",
        "sum",
        "of",
        "and",
        "answer",
        "a",
        "b",
        "c",
        "x",
        "y",
        "z",
        "yes",
        "no",
        "ok",
    ]
)


# joins the messages' words, so conversational prompts (the CLI's datasets) work on the tiny model
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


def save_tiny_model(
    path: Path, vocab_size: int = len(WORDS), seed: int = 0, tie_word_embeddings: bool = False, **overrides
) -> Path:
    """A 2-layer Llama with a 16-wide residual stream, saved with its tokenizer to `path`."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    # AutoTokenizer reloads a saved WordLevel tokenizer as a Qwen2Tokenizer that silently encodes to [];
    # PreTrainedTokenizerFast loads it as it was saved
    return PreTrainedTokenizerFast.from_pretrained(path)


def prompt_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [f"what is {i % 10} + {(3 * i) % 10} ?" for i in range(n)]})


def reward_length(completions: list[str], **_) -> list[float]:
    """Rewards that differ within a group, so advantages are non-zero."""
    return [float(len(c.split())) for c in completions]

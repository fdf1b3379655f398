"""What `tike-trl analyze` scores: the policy and the reference (by default the model `tike-trl
train` saved, else a built-in shifted policy, against the embedded model), the prompts, and pools
of completions sampled exactly from the policy with the states that predicted each token.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..scripts import DEFAULT_OUTPUT_DIR

if TYPE_CHECKING:
    from .command import AnalysisConfig

# `tike-trl train`'s default output directory: its model is the default policy when present
TRAIN_OUTPUT_DIR = Path(DEFAULT_OUTPUT_DIR)
# without a trained policy, the policy is the reference with its logits divided by this temperature
SHIFTED_POLICY_TEMPERATURE = 0.7
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class LanguageModel:
    """A causal LM as the analysis sees it: backbone → final norm → LM head, logits / temperature.

    Keeping the final norm apart lets the analysis differentiate the KL with respect to the norm's
    weight from cached backbone states (the affordable parameter subset of the gradient section).
    """

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        if getattr(model.config, "final_logit_softcapping", None):
            raise NotImplementedError("tike-trl analyze does not support logit soft-capping (e.g. Gemma 2).")
        self.model, self.temperature = model, temperature
        self.decoder = model.get_decoder()
        self.norm = getattr(self.decoder, "norm", None)
        if self.norm is None or getattr(self.norm, "weight", None) is None:
            raise NotImplementedError(f"{type(model).__name__} has no final norm with a weight at get_decoder().norm.")
        self.head = model.get_output_embeddings()
        # transformers renamed the KV-cache argument and output field `past_key_values` → `cache`
        # (5.2x warns on the old name); take whichever the installed version's backbone accepts
        parameters = inspect.signature(self.decoder.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"

    @torch.no_grad()
    def prenorm(self, input_ids: torch.Tensor, cache=None):
        """Final hidden states before the final norm ([B, T, d]) and the updated KV cache."""
        captured = []
        handle = self.norm.register_forward_hook(lambda _module, args, _out: captured.append(args[0]))
        try:
            out = self.decoder(input_ids=input_ids, use_cache=True, **{self._cache_name: cache})
        finally:
            handle.remove()
        return captured[-1], getattr(out, self._cache_name)

    def logits(self, prenorm: torch.Tensor, norm_weight: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits; `norm_weight` replaces the norm's weight (e.g. one row per position)."""
        if norm_weight is None:
            x = self.norm(prenorm)
        else:
            x = torch.func.functional_call(self.norm, {"weight": norm_weight}, (prenorm,))
        return self.head(x).float() / self.temperature


# ---- models ----


def trained_policy_dir(root: Path = TRAIN_OUTPUT_DIR) -> Path | None:
    """`tike-trl train`'s saved model: the output directory itself, else its latest checkpoint."""
    if (root / "config.json").exists():
        return root
    checkpoints = sorted(root.glob("checkpoint-*/config.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    return checkpoints[-1].parent if checkpoints else None


def resolve_models(config: AnalysisConfig) -> dict:
    """Paths, temperatures and human-readable names of the policy and the reference."""
    if config.ref is not None:
        ref = config.ref
    else:
        from ..models import embedded_model_path

        ref = str(embedded_model_path())
    if config.policy is not None:
        policy, shift, name = config.policy, config.policy_temperature or 1.0, config.policy
    elif (trained := trained_policy_dir()) is not None:
        policy, shift, name = str(trained), config.policy_temperature or 1.0, f"{trained} (trained by tike-trl train)"
    else:
        shift = config.policy_temperature or SHIFTED_POLICY_TEMPERATURE
        policy, name = ref, f"built-in shifted policy: the reference at temperature {shift}"
    if shift != 1.0 and config.policy is not None:
        name = f"{name} at temperature {shift}"
    return {"policy": policy, "policy_shift": shift, "policy_name": name, "ref": ref}


@dataclass
class Models:
    """The loaded policy and reference; `shared` when the policy is the reference model itself
    (at another temperature), whose backbone states then serve both."""

    policy: LanguageModel
    ref: LanguageModel
    tokenizer: object
    names: dict
    shared: bool


def load_models(config: AnalysisConfig, tokenizer=None) -> Models:
    """Load the policy and the reference in float32 (one model when they are the same), checking that
    they share a vocabulary larger than every k."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = resolve_models(config)

    def load(path: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)

    ref_model = load(names["ref"])
    shared = names["policy"] == names["ref"] or Path(names["policy"]).resolve() == Path(names["ref"]).resolve()
    policy_model = ref_model if shared else load(names["policy"])
    vocab = policy_model.get_output_embeddings().weight.shape[0]
    if vocab != ref_model.get_output_embeddings().weight.shape[0]:
        raise InputError("The policy and the reference have different vocabularies; they must share a tokenizer.")
    if max(*config.ks, config.tike_k) > vocab:
        raise InputError(f"k={max(*config.ks, config.tike_k)} is larger than the vocabulary ({vocab} tokens).")
    return Models(
        policy=LanguageModel(policy_model, config.temperature * names["policy_shift"]),
        ref=LanguageModel(ref_model, config.temperature),
        tokenizer=tokenizer or AutoTokenizer.from_pretrained(names["policy"]),
        names=names,
        shared=shared,
    )


# ---- prompts ----


def arithmetic_prompts(n: int, seed: int) -> list[list[dict]]:
    """The embedded task: "What is a + b?" chat prompts with two-digit operands."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [[{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}] for a, b in pairs]


def dataset_prompts(name: str, split: str, n: int) -> list:
    """The first `n` entries of the "prompt" column of a dataset: a local .json/.jsonl/.csv/.parquet
    file, or anything `datasets.load_dataset` accepts."""
    from datasets import load_dataset

    path = Path(name)
    if path.is_file():
        if path.suffix not in DATA_FILE_FORMATS:
            raise InputError(f"--dataset {name}: unknown file type; use one of {', '.join(DATA_FILE_FORMATS)}.")
        data = load_dataset(DATA_FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        data = load_dataset(name, split=split)
    if "prompt" not in data.column_names:
        raise InputError(f"--dataset {name} has no 'prompt' column (columns: {', '.join(data.column_names)}).")
    return data.select(range(min(n, len(data))))["prompt"]


def encode_prompt(prompt, tokenizer) -> torch.Tensor:
    """Token ids [1, T] of a text or conversational prompt, as TRL's GRPO trainer encodes it."""
    from trl.data_utils import maybe_apply_chat_template

    text = maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise InputError(f"The tokenizer encodes the prompt {text[:60]!r} to no tokens.")
    return torch.tensor([ids])


def stop_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


# ---- sampling ----


@dataclass
class Pool:
    """Sequences sampled from the policy for one prompt and the states that scored them."""

    tokens: torch.Tensor  # [P, L] sampled ids (anything after a stop token is padding)
    layout: torch.Tensor  # [P, L] bool, real positions (up to and including the stop token)
    policy_states: torch.Tensor  # [P, L, d] policy states before the final norm, predicting each token
    ref_states: torch.Tensor | None = None  # the reference's, when it is a different model


@torch.no_grad()
def sample_pool(
    policy: LanguageModel,
    prompt_ids: torch.Tensor,
    size: int,
    max_len: int,
    stop: set[int],
    generator: torch.Generator,
    progress: tqdm,
) -> Pool:
    """Sample `size` completions exactly from the policy's (temperature-scaled) distribution,
    keeping the state that predicted each token. The prompt is encoded once and its KV cache
    shared by every sample."""
    states, cache = policy.prenorm(prompt_ids)
    cache.batch_repeat_interleave(size)
    last = states[:, -1].expand(size, -1)
    stop_tensor = torch.tensor(sorted(stop), dtype=torch.long)
    tokens = torch.zeros((size, max_len), dtype=torch.long)
    layout = torch.zeros((size, max_len), dtype=torch.bool)
    kept = torch.zeros((size, max_len, last.shape[-1]), dtype=torch.float32)
    done = torch.zeros(size, dtype=torch.bool)
    for t in range(max_len):
        probs = torch.softmax(policy.logits(last), dim=-1)
        tokens[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        layout[:, t] = ~done
        kept[:, t] = last.float()
        done |= torch.isin(tokens[:, t], stop_tensor)
        progress.update(1)
        if bool(done.all()):
            progress.update(max_len - t - 1)
            break
        states, cache = policy.prenorm(tokens[:, t : t + 1], cache)
        last = states[:, -1]
    return Pool(tokens, layout, kept)


@torch.no_grad()
def reference_states(ref: LanguageModel, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's states before its final norm, predicting each sampled token ([P, L, d])."""
    states, cache = ref.prenorm(prompt_ids)
    first = states[:, -1:].expand(tokens.shape[0], -1, -1)
    if tokens.shape[1] == 1:
        return first.float()
    cache.batch_repeat_interleave(tokens.shape[0])
    rest, _ = ref.prenorm(tokens[:, :-1], cache)
    return torch.cat([first, rest], dim=1).float()

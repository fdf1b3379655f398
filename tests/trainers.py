"""Trainers on the tiny local model, shared by the trainer tests: the common settings, a builder
for ours (or TRL's), and one fixed generation batch from TRL's own trainer."""

from __future__ import annotations

import torch
from tiny import load_tokenizer, prompt_dataset, reward_length
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from tike_trl import TIKEConfig, TIKEGRPOTrainer

# two fp32 CPU steps of 4 completions (one group) of at most 8 tokens, no checkpoints, no progress bar
COMMON = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    max_steps=2,
    learning_rate=5e-2,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    bf16=False,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)


def make_trainer(
    model_dir, tmp_path, cls=TIKEGRPOTrainer, config_cls=TIKEConfig, model=None, peft_config=None, **overrides
):
    """A `cls` trainer (ours by default) on the model saved in `model_dir` (or `model`, with a new
    adapter from `peft_config`), with `COMMON`, beta 0.05 and `overrides` as its config, writing
    under `tmp_path / "out"`."""
    args = config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, "beta": 0.05, **overrides})
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    return cls(
        model=model,
        reward_funcs=reward_length,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=load_tokenizer(model_dir),
        peft_config=peft_config,
    )


def fixed_batch(model_dir, tmp_path):
    """TRL's own trainer (k3) and one generation batch from it, with its reference log-probs."""
    torch.manual_seed(0)
    trl_trainer = make_trainer(model_dir, tmp_path, cls=GRPOTrainer, config_cls=GRPOConfig)
    trl_trainer.model.train()
    batch = next(iter(trl_trainer.get_train_dataloader()))
    torch.manual_seed(0)
    return trl_trainer, trl_trainer._generate_and_score_completions(batch)

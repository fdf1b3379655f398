"""A few steps of TIKEGRPOTrainer on a tiny local model, for launcher tests (`tests/launch.py`).

Runs under `python` or `accelerate launch` and writes, from the main process, a JSON file with
the world size, the ranks that answered a collective, whether the LM head is ZeRO-3 sharded, and
per-step loss, grad_norm, kl (and kl/topk_mass, reward). `--rollout deterministic` replaces
sampling by completions that depend only on the prompt and on which repeat of it they are, so
that runs with different process counts see the same global batch.

    accelerate launch --config_file tike_trl/recipes/accelerate/zero3.yaml --num_processes 2 \
        tests/scripts/train_tiny.py --model-dir DIR --out result.json --kl-estimator tike
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py

import torch  # noqa: E402
from tiny import load_tokenizer, prompt_dataset, reward_length  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tike_trl import TIKEConfig, TIKEGRPOTrainer  # noqa: E402
from tike_trl.scripts.grpo import finish  # noqa: E402

LOGGED = ("loss", "grad_norm", "kl", "kl/topk_mass", "reward")


def deterministic_rollout(prompts: list[str], trainer: TIKEGRPOTrainer) -> dict:
    """GRPOTrainer's `rollout_func`: completions drawn from a generator seeded by (prompt, repeat
    index), with lengths that differ within a group so that the advantages are not all zero."""
    tokenizer = trainer.processing_class
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    first_token = max(tokenizer.all_special_ids) + 1
    max_len = trainer.max_completion_length
    repeats: Counter = Counter()
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
    for prompt in prompts:
        rng = random.Random(f"{prompt}|{repeats[prompt]}")
        repeats[prompt] += 1
        length = rng.randint(1, max_len - 1)
        completion = [rng.randrange(first_token, vocab) for _ in range(length)] + [eos]
        out["prompt_ids"].append(tokenizer(prompt)["input_ids"])
        out["completion_ids"].append(completion)
        out["logprobs"].append([0.0] * len(completion))  # sampling log-probs: only vLLM's IS correction reads them
    return out


class StepLog(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append({"step": state.global_step, **{k: logs[k] for k in LOGGED if k in logs}})


def head_is_sharded(model) -> bool:
    """True when the LM head weight is a ZeRO-3 partition (empty outside a gather)."""
    weight = model.get_output_embeddings().weight
    return hasattr(weight, "ds_id") and weight.numel() == 0


def run(
    model_dir: str,
    output_dir: str,
    kl_estimator: str = "tike",
    steps: int = 2,
    per_device_batch: int = 4,
    num_generations: int = 4,
    gradient_accumulation_steps: int = 1,
    rollout: str = "sample",
    beta: float = 0.05,
    learning_rate: float = 5e-2,
    **config,
) -> dict:
    """Train and return what the JSON file holds (every process returns it; the main one writes it)."""
    args = TIKEConfig(
        output_dir=output_dir,
        kl_estimator=kl_estimator,
        tike_top_k=4,
        beta=beta,
        max_steps=steps,
        per_device_train_batch_size=per_device_batch,
        num_generations=num_generations,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_completion_length=8,
        learning_rate=learning_rate,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        bf16=False,
        **config,
    )
    log = StepLog()
    trainer = TIKEGRPOTrainer(
        model=model_dir,
        reward_funcs=reward_length,
        args=args,
        train_dataset=prompt_dataset(16),
        processing_class=load_tokenizer(model_dir),
        callbacks=[log],
        rollout_func=deterministic_rollout if rollout == "deterministic" else None,
    )
    # sharding is visible only after the trainer has prepared the model (ZeRO-3 partitions at init)
    sharded = {
        "policy": head_is_sharded(trainer.model),
        "reference": trainer.ref_model is not None and head_is_sharded(trainer.ref_model),
    }
    trainer.train()
    accelerator = trainer.accelerator
    from accelerate.utils import gather_object

    result = {
        "world_size": accelerator.num_processes,
        "ranks": sorted(gather_object([accelerator.process_index])),
        "distributed_type": str(accelerator.distributed_type),
        "head_sharded": sharded,
        "kl_estimator": kl_estimator,
        "steps": log.steps,
    }
    finish(trainer)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True, help="JSON file the main process writes")
    parser.add_argument("--kl-estimator", default="tike")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--rollout", choices=("sample", "deterministic"), default="sample")
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=5e-2)
    parser.add_argument("--kl-gradient", default="token")
    parser.add_argument("--kl-sequence-baseline", default="running_mean")
    parser.add_argument(
        "--use-cpu",
        action=argparse.BooleanOptionalAction,
        default=not torch.cuda.is_available(),
        help="TrainingArguments.use_cpu (default: on without CUDA)",
    )
    a = parser.parse_args()
    result = run(
        a.model_dir,
        str(Path(a.out).parent / "trainer"),
        a.kl_estimator,
        a.steps,
        a.per_device_batch,
        a.num_generations,
        a.gradient_accumulation_steps,
        a.rollout,
        a.beta,
        a.learning_rate,
        use_cpu=a.use_cpu,
        kl_gradient=a.kl_gradient,
        kl_sequence_baseline=a.kl_sequence_baseline,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    # Skip interpreter finalisation: the tests check the run, not the exit, and a gloo process group
    # reached only there can still abort a rank (SIGABRT, no Python frame), rarely, after a good run
    # (`tike_trl.scripts.grpo.finish` makes it rare: docs/reliability.md has the counts).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

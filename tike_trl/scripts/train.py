"""Train a model with GRPO and the TIKE KL estimator (`tike-trl train`).

With no arguments it trains the embedded default, SmolLM2-135M-Instruct on arithmetic generated
in code, offline, sized for a few minutes on 2 CPU cores. `--config FILE` takes the YAML files of
`recipes/configs/` (any TIKEConfig, ModelConfig or TaskArguments field); the flags override it.
"""

from __future__ import annotations

import argparse
import time

from ..errors import InputError
from ..estimators import ESTIMATORS
from . import DEFAULT_OUTPUT_DIR

# The embedded default (also recipes/configs/smollm2_arithmetic.yaml; a test keeps them equal).
# Sized on 2 CPU cores: 16 completions of at most 8 tokens per step, no gradient checkpointing
# (a 135M model needs no memory saving, and checkpointing would recompute every forward).
EMBEDDED_DEFAULTS = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "kl_estimator": "tike",
    "tike_top_k": 16,
    "beta": 1e-3,
    "max_steps": 30,
    "per_device_train_batch_size": 16,
    "num_generations": 8,
    "max_completion_length": 8,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}

# the short flags and the TIKEConfig / ModelConfig / TaskArguments fields they set
FLAGS = {
    "model": "model_name_or_path",
    "dataset": "dataset_name",
    "kl_estimator": "kl_estimator",
    "top_k": "tike_top_k",
    "steps": "max_steps",
    "output_dir": "output_dir",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--dataset",
        help="Hub id, or a local .json/.jsonl file with 'prompt' and 'answer' (default: the embedded arithmetic task)",
    )
    parser.add_argument("--kl-estimator", choices=ESTIMATORS, help="KL estimator (default: tike)")
    parser.add_argument("--top-k", type=int, help="k of the tike estimator (default: 16)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default: {EMBEDDED_DEFAULTS['max_steps']})")
    parser.add_argument(
        "--output-dir", help=f"where the model, metrics.jsonl and training.png go (default: {DEFAULT_OUTPUT_DIR})"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML of TIKEConfig/ModelConfig/TaskArguments fields, as "
        "in recipes/configs/; replaces the embedded defaults",
    )


def parse_config(args: argparse.Namespace):
    """(TaskArguments, TIKEConfig, ModelConfig) from the embedded defaults (or the config file),
    then the flags, through TRL's own parser so that YAML keys mean what they mean in TRL scripts."""
    import yaml
    from trl import ModelConfig, TrlParser

    from ..config import TIKEConfig
    from .grpo import TaskArguments

    parser = TrlParser((TaskArguments, TIKEConfig, ModelConfig), prog="tike-trl train --config", exit_on_error=False)
    parser.set_defaults(**(EMBEDDED_DEFAULTS if args.config is None else {"output_dir": DEFAULT_OUTPUT_DIR}))
    argv = ["--config", args.config] if args.config is not None else []
    for flag, dest in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{dest}", str(value)]
    where = f"config file {args.config!r}" if args.config else "arguments"
    try:
        return parser.parse_args_and_config(argv)
    except FileNotFoundError as err:
        raise InputError(f"config file {args.config!r}: no such file") from err
    except (yaml.YAMLError, argparse.ArgumentError, ValueError, TypeError) as err:
        raise InputError(f"{where}: {' '.join(str(err).split())}") from err


def run(args: argparse.Namespace) -> int:
    from .grpo import finish, summary, train

    task, training_args, model_args = parse_config(args)
    started = time.monotonic()
    trainer = train(task, training_args, model_args)
    if trainer.accelerator.is_main_process:
        s = summary(training_args.output_dir)
        print(
            f"trained {s['steps']} steps in {time.monotonic() - started:.0f} s; mean reward "
            f"{s.get('reward_start', float('nan')):.3f} (first 5 steps) -> {s.get('reward_end', float('nan')):.3f} "
            f"(last 5); model, metrics.jsonl and training.png in {training_args.output_dir}"
        )
    finish(trainer)
    return 0

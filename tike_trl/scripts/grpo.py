"""One GRPO run with `TIKEGRPOTrainer`, as `tike-trl train` and `recipes/grpo_tike.py` launch it:
the three dataclasses TRL scripts parse (script arguments, `TIKEConfig`, `ModelConfig`) in, a
trained model, `metrics.jsonl` and `training.png` in `output_dir` out.

With no model and no dataset it trains the embedded default: SmolLM2-135M-Instruct
(`tike_trl.models`) on arithmetic generated in code (`tike_trl.scripts.data`).
"""

from __future__ import annotations

import gc
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers.trainer_callback import ProgressCallback
from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config

from ..config import TIKEConfig
from ..errors import InputError
from ..models import embedded_model_path
from ..rewards import REWARDS, resolve_reward
from ..trainer import TIKEGRPOTrainer
from .data import arithmetic_dataset, load_prompt_answer_dataset
from .run_log import CompactProgress, MetricsFile, plot_training, read_metrics

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass
class TaskArguments(ScriptArguments):
    """TRL's script arguments (`dataset_name`, `dataset_config`, `dataset_train_split`, ...) plus
    the reward and the embedded task. No `dataset_name` means the embedded arithmetic task."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_number"],
        metadata={"help": f"Reward functions: {', '.join(REWARDS)}, or dotted import paths to your own."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Dataset column holding the prompt."})
    answer_column: str = field(
        default="answer",
        metadata={
            "help": "Dataset column holding the reference answer (verl-style `reward_model.ground_truth` "
            "is found on its own)."
        },
    )
    arithmetic_problems: int = field(default=2000, metadata={"help": "Rows of the embedded arithmetic task."})
    arithmetic_max_operand: int = field(default=9, metadata={"help": "Largest operand of the embedded task."})
    arithmetic_operations: str = field(default="+", metadata={"help": "Operations of the embedded task, from '+-*'."})


def train_dataset(task: TaskArguments, seed: int = 0) -> Dataset:
    if task.dataset_name is None:
        return arithmetic_dataset(
            task.arithmetic_problems, seed, task.arithmetic_max_operand, task.arithmetic_operations
        )
    return load_prompt_answer_dataset(
        task.dataset_name, task.dataset_train_split, task.dataset_config, task.prompt_column, task.answer_column
    )


def check_model(name: str) -> None:
    """Fail with one line, before any loading, if `name` is neither a saved model folder nor a Hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model {name!r}: the folder has no config.json, so it is not a saved transformers model")
        return
    if path.exists() or not _HUB_ID.fullmatch(name):
        raise InputError(f"model {name!r}: no such model folder, and not a Hugging Face Hub id (org/name)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise InputError(
            f"model {name!r}: no such local folder, and the Hub could not provide it "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
        ) from err


def check_output_dir(output_dir: str) -> None:
    """Create `output_dir` and write a probe file into it, so a bad path fails now, not after training."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise InputError(f"output dir {output_dir!r} is not writable: {err.strerror or err}") from err


def build_trainer(task: TaskArguments, args: TIKEConfig, model_args: ModelConfig, **trainer_kwargs) -> TIKEGRPOTrainer:
    """The trainer for one run, with the metrics file and the compact progress bar attached."""
    model = model_args.model_name_or_path or str(embedded_model_path())
    check_model(model)
    check_output_dir(args.output_dir)
    rewards = [resolve_reward(name) for name in task.reward_funcs]
    dataset = train_dataset(task, args.seed)
    args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(args.model_init_kwargs or {}),
    }
    trainer = TIKEGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=[MetricsFile(Path(args.output_dir) / "metrics.jsonl")],
        **trainer_kwargs,
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress)
    return trainer


def train(task: TaskArguments, args: TIKEConfig, model_args: ModelConfig, **trainer_kwargs) -> TIKEGRPOTrainer:
    """Train, save the model (and tokenizer) to `args.output_dir`, and plot the curves there.
    Call `finish(trainer)` when done with it."""
    trainer = build_trainer(task, args, model_args, **trainer_kwargs)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        output = Path(args.output_dir)
        name = model_args.model_name_or_path or "SmolLM2-135M-Instruct (embedded)"
        plot_training(
            output / "metrics.jsonl",
            output / "training.png",
            title=f"{name}, kl_estimator={args.kl_estimator}, beta={args.beta}",
        )
    return trainer


def finish(trainer: TIKEGRPOTrainer) -> None:
    """Free the wrapped model (DDP, DeepSpeed engine) and then destroy the process group, once every
    rank is done. On CPU a DDP model still alive at interpreter exit keeps its gloo process group
    alive, and the process aborts (SIGABRT, "terminate called without an active exception") in
    about 1 launch in 20 after a successful run; DeepSpeed's engine needs the group to be freed."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    gc.collect()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the group
        trainer.end()


def summary(output_dir: str, window: int = 5) -> dict:
    """Steps, wall time and mean reward over the first and last `window` steps of a finished run."""
    rows = [r for r in read_metrics(Path(output_dir) / "metrics.jsonl") if "reward" in r]
    if not rows:
        return {"steps": 0}
    first, last = rows[:window], rows[-window:]
    return {
        "steps": rows[-1]["step"],
        "wall_s": rows[-1]["elapsed_s"],
        "reward_start": sum(r["reward"] for r in first) / len(first),
        "reward_end": sum(r["reward"] for r in last) / len(last),
        "kl_end": last[-1].get("kl"),
    }

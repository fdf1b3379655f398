"""Train a model with GRPO and a tike-trl KL estimator: TRL's GRPO script with TIKEGRPOTrainer.

As in TRL (`trl/scripts/grpo.py`), TrlParser reads four dataclasses from a YAML file (`--config
FILE`) and from the command line, which overrides the file: the script arguments
(`GRPOScriptArguments`: dataset, columns, reward functions), `TIKEConfig` (TRL's GRPOConfig plus
`kl_estimator`, `tike_top_k`, `tike_tail`, ...), TRL's `ModelConfig` and TRL's
`DatasetMixtureConfig` (a `datasets:` list). Every field is a flag: `--kl_estimator rb --beta 0.01
--learning_rate 1e-6 --report_to wandb --use_vllm true --resume_from_checkpoint DIR`; `--model`,
`--dataset` and `--steps` are short for `--model_name_or_path`, `--dataset_name` and `--max_steps`.

Without `--config` the defaults are the embedded run's (`tike-trl recipes smollm2_arithmetic`):
SmolLM2-135M-Instruct (`tike_trl.models`) on arithmetic generated in code, offline, a few minutes
on 2 CPU cores. A run writes the model, `metrics.jsonl` and `training.png` to `output_dir`.

    tike-trl train --kl_estimator rb --max_steps 10
    python -m tike_trl.scripts.grpo --config "$(tike-trl recipes qwen2.5-1.5b_dapo)"
    accelerate launch --config_file "$(tike-trl recipes zero3)" --num_processes 8 \\
        -m tike_trl.scripts.grpo --config "$(tike-trl recipes qwen2.5-7b_dapo)"
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_callback import ProgressCallback
from trl import DatasetMixtureConfig, ModelConfig, TrlParser, get_peft_config, get_quantization_config
from trl.scripts.grpo import GRPOScriptArguments as TRLGRPOScriptArguments

from ..config import TIKEConfig
from ..errors import InputError
from ..extras import MissingExtraError, require
from ..models import EmbeddedModelMissing, embedded_model_path
from ..recipes import recipe_path
from ..rewards import REWARDS, TRL_REWARDS, resolve_reward
from ..trainer import TIKEGRPOTrainer
from . import DEFAULT_OUTPUT_DIR
from .data import arithmetic_splits, check_reward_columns, load_splits, split, with_conversational_prompt
from .run_log import CompactProgress, MetricsFile, plot_training, read_metrics

PROG = "tike_trl.scripts.grpo"
# the defaults without --config (`tike-trl train` with no arguments, `make train`)
EMBEDDED_CONFIG = recipe_path("smollm2_arithmetic")
# short spellings kept from the first `tike-trl train`: flag -> (field, type)
ALIASES = {"--model": ("model_name_or_path", str), "--dataset": ("dataset_name", str), "--steps": ("max_steps", int)}
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
logger = logging.getLogger(__name__)


@dataclass
class GRPOScriptArguments(TRLGRPOScriptArguments):
    """TRL's GRPO script arguments (`dataset_name`, `dataset_config`, `dataset_train_split`,
    `dataset_test_split`, `dataset_streaming`, `reward_funcs`, `reward_model_name_or_path`), plus
    the columns our rewards read and the embedded task. No dataset means the embedded task."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_number"],
        metadata={
            "help": f"Reward functions: ours ({', '.join(REWARDS)}), TRL's ({', '.join(TRL_REWARDS)}), or dotted "
            "import paths (e.g. trl.rewards.accuracy_reward, my_module.my_reward)."
        },
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "Dataset column holding the prompt (a string or chat messages)."}
    )
    answer_column: str | None = field(
        default=None,
        metadata={
            "help": "Column our rewards read the reference answer from (a dotted name reads inside a struct, as "
            "reward_model.ground_truth). Unset: the first of solution, answer, reward_model.ground_truth the "
            "dataset has. TRL's rewards read `solution`."
        },
    )
    arithmetic_problems: int = field(default=2000, metadata={"help": "Rows of the embedded arithmetic task."})
    arithmetic_max_operand: int = field(default=9, metadata={"help": "Largest operand of the embedded task."})
    arithmetic_operations: str = field(default="+", metadata={"help": "Operations of the embedded task, from '+-*'."})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class ScriptParser(TrlParser):
    """TrlParser as TRL's scripts use it, with three differences: without `--config` the embedded
    run's config is the default; unknown config keys fail too; bad input raises `InputError` (one
    line) instead of printing the usage of several hundred flags."""

    def error(self, message: str):
        raise InputError(message)

    def parse_args_and_config(
        self,
        args=None,
        return_remaining_strings: bool = False,
        fail_with_unknown_args: bool = True,
        separate_remaining_strings: bool = False,
    ):
        import yaml

        args = [part for arg in (sys.argv[1:] if args is None else args) for part in _split_config_flag(arg)]
        if "--config" not in args:
            args = ["--config", str(EMBEDDED_CONFIG), *args]
        elif args.index("--config") == len(args) - 1:
            raise InputError("argument --config: expected a YAML file")
        config = args[args.index("--config") + 1]
        try:
            *parsed, config_rest, cli_rest = super().parse_args_and_config(
                args, return_remaining_strings=True, separate_remaining_strings=True
            )
        except InputError:
            raise
        except FileNotFoundError as err:
            raise InputError(f"config file {config!r}: no such file") from err
        except OSError as err:
            raise InputError(f"config file {config!r}: {err.strerror or err}") from err
        except yaml.YAMLError as err:
            raise InputError(f"config file {config!r}: {_one_line(err)}") from err
        except (ValueError, TypeError) as err:  # a dataclass refusing a value; TrlParser's own checks
            raise InputError(_one_line(err)) from err
        if return_remaining_strings:
            rest = (config_rest, cli_rest) if separate_remaining_strings else (config_rest + cli_rest,)
            return (*parsed, *rest)
        if fail_with_unknown_args and config_rest:
            raise InputError(f"config file {config!r}: unknown keys: {', '.join(k[2:] for k in config_rest[::2])}")
        if cli_rest:
            raise InputError(f"unrecognized arguments: {' '.join(cli_rest)}")
        return tuple(parsed)


def make_parser(prog: str | None = None) -> ScriptParser:
    """The parser of `tike-trl train` and of this script: every field of `GRPOScriptArguments`,
    `TIKEConfig`, `ModelConfig` and `DatasetMixtureConfig` as a flag, plus `--config FILE`."""
    parser = ScriptParser(
        (GRPOScriptArguments, TIKEConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog or PROG,
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults(output_dir=DEFAULT_OUTPUT_DIR)
    short = parser.add_argument_group("short spellings")
    for flag, (dest, kind) in ALIASES.items():
        short.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"same as --{dest}")
    return parser


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


def check_integrations(training_args: TIKEConfig) -> None:
    """One line, not a traceback from inside the trainer, when `report_to` or `use_vllm` asks for
    a package that is not installed."""
    from transformers.integrations import get_available_reporting_integrations
    from trl.import_utils import is_vllm_available

    available = get_available_reporting_integrations()
    for name in training_args.report_to or []:
        if name not in ("all", "none") and name not in available:
            installed = ", ".join(available) or "none"
            raise InputError(f"report_to {name!r}: not an installed reporting integration (installed: {installed})")
    if training_args.use_vllm and not is_vllm_available():
        raise InputError("use_vllm: vLLM is not installed (pip install 'trl[vllm]')")


def model_path(model_args: ModelConfig) -> str:
    """`model_name_or_path`, checked; unset, the embedded SmolLM2-135M-Instruct (converted on first use)."""
    if model_args.model_name_or_path:
        check_model(model_args.model_name_or_path)
        return model_args.model_name_or_path
    try:
        return str(embedded_model_path())
    except EmbeddedModelMissing as err:
        raise InputError(f"no model_name_or_path, and {str(err)[0].lower()}{str(err)[1:]}") from err


def reward_functions(script_args: GRPOScriptArguments) -> list:
    """The reward model and functions, as TRL's script resolves them; ours read `answer_column`."""
    funcs: list = []
    if script_args.reward_model_name_or_path:
        check_model(script_args.reward_model_name_or_path)
        funcs.append(script_args.reward_model_name_or_path)
    if os.getcwd() not in sys.path:  # as TRL's script: a reward module in the current directory by dotted path
        sys.path.insert(0, os.getcwd())
    for name in script_args.reward_funcs or []:
        func = resolve_reward(name)
        if func in REWARDS.values() and script_args.answer_column:
            func = functools.update_wrapper(functools.partial(func, answer_column=script_args.answer_column), func)
        funcs.append(func)
    if not funcs:
        raise InputError("no reward: set reward_funcs (or reward_model_name_or_path)")
    return funcs


def datasets(script_args: GRPOScriptArguments, training_args: TIKEConfig, dataset_args: DatasetMixtureConfig | None):
    """(train, eval or None, a name for messages), as TRL's script chooses the data: a `datasets:`
    mixture, else `dataset_name`, else the embedded arithmetic task; prompts made conversational."""
    if dataset_args is not None and dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: the `datasets` mixture is used.")
        splits, source = load_splits(mixture=dataset_args), "(the datasets mixture)"
    elif script_args.dataset_name:
        source = repr(script_args.dataset_name)
        splits = load_splits(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    else:
        source = "(the embedded arithmetic task)"
        splits = arithmetic_splits(
            script_args.arithmetic_problems,
            training_args.seed,
            script_args.arithmetic_max_operand,
            script_args.arithmetic_operations,
        )
    train = split(splits, script_args.dataset_train_split, source)
    evaluate = None
    if training_args.eval_strategy != "no":
        why = f" for evaluation (eval_strategy={training_args.eval_strategy.value})"
        evaluate = split(splits, script_args.dataset_test_split, source, why)
    train = with_conversational_prompt(train, source, script_args.prompt_column)
    if evaluate is not None:
        evaluate = with_conversational_prompt(evaluate, source, script_args.prompt_column)
    return train, evaluate, source


def build_trainer(
    script_args: GRPOScriptArguments,
    training_args: TIKEConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
    **trainer_kwargs,
) -> TIKEGRPOTrainer:
    """The trainer for one run, with the metrics file and the compact progress bar attached;
    every input checked first, so that bad input fails in one line before any loading."""
    check_integrations(training_args)
    model = model_path(model_args)
    check_output_dir(training_args.output_dir)
    rewards = reward_functions(script_args)
    train_dataset, eval_dataset, source = datasets(script_args, training_args, dataset_args)
    for data in (train_dataset, eval_dataset):
        if data is not None:
            check_reward_columns(data, rewards, script_args.answer_column, source)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = TIKEGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=[MetricsFile(Path(training_args.output_dir) / "metrics.jsonl")],
        **trainer_kwargs,
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress)
    return trainer


def main(
    script_args: GRPOScriptArguments,
    training_args: TIKEConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """Train; save the model (and tokenizer) to `output_dir` and plot the curves there; push to
    the Hub if `push_to_hub`; free the model and the process group."""
    started = time.monotonic()
    try:  # said before training, not after: the run goes on without the plot
        require("matplotlib", "training.png")
        plots = True
    except MissingExtraError as err:
        print(f"tike-trl: note: {err}; metrics.jsonl is written all the same", file=sys.stderr)
        plots = False
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    output = Path(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        name = model_args.model_name_or_path or "SmolLM2-135M-Instruct (embedded)"
        if plots:
            plot_training(
                output / "metrics.jsonl",
                output / "training.png",
                title=f"{name}, kl_estimator={training_args.kl_estimator}, beta={training_args.beta}",
            )
        s = summary(training_args.output_dir)
        print(
            f"trained {s['steps']} steps in {time.monotonic() - started:.0f} s; mean reward "
            f"{s.get('reward_start', float('nan')):.3f} (first 5 steps) -> {s.get('reward_end', float('nan')):.3f} "
            f"(last 5); model, metrics.jsonl and training.png in {training_args.output_dir}"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    finish(trainer)


def run(args: argparse.Namespace) -> int:
    """`tike-trl train ARGS...`: the command line gives this script's arguments in `args.argv`."""
    main(*make_parser(prog="tike-trl train").parse_args_and_config(args.argv))
    return 0


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


def _split_config_flag(arg: str) -> list[str]:
    return ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    try:
        main(*make_parser().parse_args_and_config())
    except InputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)

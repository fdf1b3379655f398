"""recipes/configs/*.yaml parse into TIKEConfig/ModelConfig/TaskArguments with the paper's
settings, the SmolLM2 config is exactly `tike-trl train`'s default, and recipes/grpo_tike.py runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from trl import ModelConfig, TrlParser

from tike_trl import TIKEConfig
from tike_trl.scripts.grpo import TaskArguments
from tike_trl.scripts.run_log import read_metrics
from tike_trl.scripts.train import FLAGS, parse_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
GLOBAL_BATCH = 512
# the paper's GPU count for each model, and the other count the config's header gives
PAPER = {
    "qwen2.5-1.5b_dapo": {"model": "Qwen/Qwen2.5-1.5B-Instruct", "gpus": {4: 16, 8: 8}},
    "qwen2.5-7b_dapo": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpus": {8: 16, 4: 32}},
}


def parse(name: str, *overrides: str):
    # use_cpu: the GPU configs ask for bf16, which TrainingArguments refuses on a CPU-only machine otherwise
    return TrlParser((TaskArguments, TIKEConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(CONFIGS / f"{name}.yaml"), "--use_cpu", "true", *overrides]
    )


def test_every_config_parses():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(["smollm2_arithmetic", *PAPER])
    for path in CONFIGS.glob("*.yaml"):
        task, args, model = parse(path.stem)
        assert args.kl_estimator == "tike" and args.beta == 1e-3


@pytest.mark.parametrize("name", PAPER)
def test_paper_setup(name):
    task, args, model = parse(name)
    assert model.model_name_or_path == PAPER[name]["model"]
    assert (args.learning_rate, args.num_generations, args.max_completion_length, args.max_steps) == (
        1e-6,
        8,
        4096,
        500,
    )
    assert args.bf16 and args.gradient_checkpointing and task.reward_funcs == ["math_answer"]
    assert task.dataset_name == "open-r1/DAPO-Math-17k-Processed" and task.answer_column == "solution"
    header = (CONFIGS / f"{name}.yaml").read_text()
    for gpus, accumulation in PAPER[name]["gpus"].items():
        assert args.per_device_train_batch_size * gpus * accumulation == GLOBAL_BATCH
        assert f"{gpus} GPUs" in header
        if accumulation != args.gradient_accumulation_steps:  # the other GPU count: the override in the header
            assert f"--gradient_accumulation_steps {accumulation}" in header
        else:
            assert f"--num_processes {gpus}" in header
    assert (GLOBAL_BATCH // args.num_generations) * args.num_generations == GLOBAL_BATCH


def test_smollm2_config_is_the_cli_default():
    no_flags = argparse.Namespace(config=None, **{flag: None for flag in FLAGS})
    from_yaml = argparse.Namespace(**{**vars(no_flags), "config": str(CONFIGS / "smollm2_arithmetic.yaml")})
    for built_in, file in zip(parse_config(no_flags), parse_config(from_yaml)):
        differ = {
            f.name: getattr(built_in, f.name)
            for f in fields(built_in)
            if getattr(built_in, f.name) != getattr(file, f.name)
        }
        assert differ == {}


@pytest.mark.slow
def test_recipe_script_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "grpo_tike.py"),
        "--config",
        str(CONFIGS / "smollm2_arithmetic.yaml"),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--num_generations",
        "4",
        "--tike_top_k",
        "4",
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
    ]
    result = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("kl/topk_mass" in r for r in rows)
    assert (out / "training.png").is_file() and (out / "model.safetensors").is_file()

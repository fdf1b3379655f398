"""The shipped recipe configs (tike_trl/recipes/configs/*.yaml) parse into the script's dataclasses
with the paper's settings, the SmolLM2 config is `tike-trl train`'s default, `tike-trl recipes`
finds them, and the packaged script runs under `accelerate launch -m`."""

from __future__ import annotations

import os
import subprocess
from dataclasses import fields

import pytest
from launch import CPU_ENV, REPO, accelerate_launch

from tike_trl.cli import main
from tike_trl.errors import InputError
from tike_trl.recipes import ROOT, recipe_files, recipe_path
from tike_trl.scripts.grpo import make_parser
from tike_trl.scripts.run_log import read_metrics

CONFIGS = ROOT / "configs"
GLOBAL_BATCH = 512
# the paper's GPU count for each model, and the other count the config's header gives
PAPER = {
    "qwen2.5-1.5b_dapo": {"model": "Qwen/Qwen2.5-1.5B-Instruct", "gpus": {4: 16, 8: 8}},
    "qwen2.5-7b_dapo": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpus": {8: 16, 4: 32}},
}
# `tike-trl train` with no arguments (make train): the values of smollm2_arithmetic.yaml. Sized on 2
# CPU cores: 16 completions of at most 8 tokens per step, no gradient checkpointing (a 135M model
# needs no memory saving, and checkpointing would recompute every forward).
EMBEDDED = {
    "output_dir": "outputs/tike-train",
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
    "report_to": [],
    "seed": 0,
    "model_name_or_path": None,
    "dataset_name": None,
    "reward_funcs": ["exact_number"],
}


def parse(name: str, *overrides: str):
    # use_cpu: the GPU configs ask for bf16, which TrainingArguments refuses on a CPU-only machine otherwise
    return make_parser().parse_args_and_config(
        ["--config", str(CONFIGS / f"{name}.yaml"), "--use_cpu", "true", *overrides]
    )


def test_every_config_parses():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(["smollm2_arithmetic", *PAPER])
    for path in CONFIGS.glob("*.yaml"):
        script, args, model, mixture = parse(path.stem)
        assert args.kl_estimator == "tike" and args.beta == 1e-3


@pytest.mark.parametrize("name", PAPER)
def test_paper_setup(name):
    script, args, model, _ = parse(name)
    assert model.model_name_or_path == PAPER[name]["model"]
    assert (args.learning_rate, args.num_generations, args.max_completion_length, args.max_steps) == (
        1e-6,
        8,
        4096,
        500,
    )
    assert args.bf16 and args.gradient_checkpointing and script.reward_funcs == ["math_answer"]
    assert script.dataset_name == "open-r1/DAPO-Math-17k-Processed" and script.answer_column == "solution"
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
    built_in = make_parser().parse_args_and_config([])
    from_yaml = make_parser().parse_args_and_config(["--config", str(CONFIGS / "smollm2_arithmetic.yaml")])
    for ours, file in zip(built_in, from_yaml):
        assert [f.name for f in fields(ours) if getattr(ours, f.name) != getattr(file, f.name)] == []
    values = {f.name: getattr(d, f.name) for d in built_in for f in fields(d)}
    assert {key: values[key] for key in EMBEDDED} == EMBEDDED


def test_recipes_command(capsys):
    assert sorted(recipe_files()) == sorted(["ddp", "zero2", "zero3", "fsdp2", "smollm2_arithmetic", *PAPER])
    assert main(["recipes", "zero3"]) == 0
    assert capsys.readouterr().out.strip() == str(ROOT / "accelerate" / "zero3.yaml")
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(str(path) in listed for path in recipe_files().values())
    assert recipe_path("configs/qwen2.5-7b_dapo.yaml") == CONFIGS / "qwen2.5-7b_dapo.yaml"
    with pytest.raises(InputError, match="no recipe 'zero4'"):
        recipe_path("zero4")


@pytest.mark.slow
def test_packaged_script_under_accelerate_launch(tiny_model_dir, tmp_path):
    """`accelerate launch -m tike_trl.scripts.grpo` through the packaged ddp.yaml, on 2 CPU processes."""
    out = tmp_path / "run"
    cmd = [
        *accelerate_launch("ddp"),
        "-m",
        "tike_trl.scripts.grpo",
        *("--config", str(recipe_path("smollm2_arithmetic")), "--model_name_or_path", str(tiny_model_dir)),
        *("--max_steps", "2", "--per_device_train_batch_size", "2", "--num_generations", "4", "--tike_top_k", "4"),
        *("--output_dir", str(out), "--disable_tqdm", "true", "--use_cpu", "true"),
    ]
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 2 steps" in result.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("kl/topk_mass" in r for r in rows)
    assert (out / "training.png").is_file() and (out / "model.safetensors").is_file()

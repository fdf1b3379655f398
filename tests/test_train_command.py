"""`tike-trl train` end to end on a tiny local model, and its one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tike_trl.cli import main
from tike_trl.scripts.run_log import read_metrics

STEPS = 2


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


def test_train_writes_model_metrics_and_plot(tiny_model_dir, jsonl_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        run_cli(
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(jsonl_dataset),
            "--steps",
            str(STEPS),
            "--output-dir",
            str(out),
            "--kl-estimator",
            "tike",
            "--top-k",
            "4",
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
    assert run_cli("--config", str(config), "--steps", "1", "--output-dir", str(out)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 1 and "kl/topk_mass" not in rows[0]  # rb: exact KL, no top-k
    assert rows[0]["completions/max_length"] <= 4


def _one_line_error(capsys, *args: str) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    message = err.splitlines()[-1]  # after any progress bar of the datasets library
    assert message.startswith("tike-trl train: error: "), err
    return message


def test_unknown_model_path(tmp_path, capsys):
    err = _one_line_error(capsys, "--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "o"))
    assert "no such model folder" in err


def test_folder_that_is_not_a_model(tmp_path, capsys):
    err = _one_line_error(capsys, "--model", str(tmp_path), "--output-dir", str(tmp_path / "o"))
    assert "no config.json" in err


def test_dataset_without_the_needed_columns(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1 + 1", "solution": "2"}))
    err = _one_line_error(
        capsys, "--model", str(tiny_model_dir), "--dataset", str(bad), "--output-dir", str(tmp_path / "o")
    )
    assert "no 'prompt' or 'answer' column" in err and "question, solution" in err


def test_unwritable_output_dir(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file (root ignores permission bits)
    err = _one_line_error(capsys, "--model", str(tiny_model_dir), "--output-dir", str(blocker / "out"))
    assert "is not writable" in err


@pytest.mark.parametrize(
    "content,expected",
    [
        ("max_steps: many\n", "invalid int value"),
        ("no_such_field: 1\n", "no_such_field"),
        ("kl_estimator: k9\n", "kl_estimator='k9'"),
        ("- a list\n", "YAML mapping"),
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

"""The embedded arithmetic task, dataset loading (local JSON/JSONL, verl-style), and the rewards."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from tike_trl.errors import InputError
from tike_trl.rewards import (
    REWARDS,
    exact_number_reward,
    final_math_answer,
    final_number,
    math_answer_reward,
    resolve_reward,
)
from tike_trl.scripts.data import ARITHMETIC_TEMPLATE, arithmetic_dataset, as_prompt_answer, load_prompt_answer_dataset


def test_arithmetic_dataset_answers_are_right():
    data = arithmetic_dataset(n=50, seed=3, max_operand=12, operations="+-*")
    assert len(data) == 50 and set(data.column_names) == {"prompt", "answer"}
    for prompt, answer in zip(data["prompt"], data["answer"]):
        assert len(prompt) == 1 and prompt[0]["role"] == "user"
        question = prompt[0]["content"].removeprefix("What is ").removesuffix("? Reply with the number only.")
        assert prompt[0]["content"] == ARITHMETIC_TEMPLATE.format(question=question)
        a, op, b = question.split()
        assert 0 <= int(a) <= 12 and 0 <= int(b) <= 12
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert arithmetic_dataset(n=50, seed=3, max_operand=12, operations="+-*")["prompt"] == data["prompt"]
    assert arithmetic_dataset(n=50, seed=4, max_operand=12, operations="+-*")["prompt"] != data["prompt"]


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(max_operand=0), dict(operations="/"), dict(operations="")])
def test_arithmetic_dataset_rejects(kwargs):
    with pytest.raises(InputError, match="arithmetic task"):
        arithmetic_dataset(**kwargs)


def test_local_jsonl_with_string_prompts(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": f"what is {i} + 1 ?", "answer": i + 1, "extra": "x"}) for i in range(3))
    )
    data = load_prompt_answer_dataset(str(path))
    assert data[0]["prompt"] == [{"role": "user", "content": "what is 0 + 1 ?"}]
    assert data["answer"] == ["1", "2", "3"]  # numbers become strings


def test_local_json_with_chat_prompts_and_other_column_names(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"question": [{"role": "user", "content": "2 + 2 ?"}], "solution": "4"}]))
    data = load_prompt_answer_dataset(str(path), prompt_column="question", answer_column="solution")
    assert data[0]["prompt"] == [{"role": "user", "content": "2 + 2 ?"}] and data[0]["answer"] == "4"


def test_verl_style_answer_is_found():
    # the layout of BytedTsinghua-SIA/DAPO-Math-17k
    rows = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "Find x."}],
                "data_source": "math_dapo",
                "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
            }
        ]
    )
    assert as_prompt_answer(rows)[0]["answer"] == "34"


@pytest.mark.parametrize(
    "row,missing", [({"question": "q", "answer": "1"}, "'prompt'"), ({"prompt": "q", "solution": "1"}, "'answer'")]
)
def test_missing_columns_is_one_clear_line(tmp_path, row, missing):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row))
    with pytest.raises(InputError) as err:
        load_prompt_answer_dataset(str(path))
    message = str(err.value)
    assert missing in message and "columns:" in message and "\n" not in message


def test_missing_file_and_unknown_local_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_prompt_answer_dataset(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="could not be loaded"):
        load_prompt_answer_dataset(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "text,number",
    [
        ("7 + 5 = 12.", "12"),
        ("12", "12"),
        ("-3", "-3"),
        ("1,024 apples", "1024"),
        ("it is 2.50", "2.50"),
        ("no digits", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_exact_number_reward_plain_and_conversational():
    completions = ["12", "7 + 5 = 12", "13", "twelve", "12.0"]
    assert exact_number_reward(completions, answer=["12"] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    chat = [[{"role": "assistant", "content": "The answer is 9"}]]
    assert exact_number_reward(chat, answer=["9"]) == [1.0]


@pytest.mark.parametrize(
    "text,answer",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"first \boxed{3}, then \boxed{4}", "4"),
        (r"\boxed{x^{2}+1}", "x^{2}+1"),
        ("work...\nAnswer: 42", "42"),
        (r"\boxed{5} but wait.\nAnswer: 6", "6"),
        (r"Answer: \boxed{7}", "7"),
        ("no answer here", None),
    ],
)
def test_final_math_answer(text, answer):
    assert final_math_answer(text) == answer


@pytest.mark.parametrize(
    "completion,reference,reward",
    [
        (r"\boxed{34}", "34", 1.0),
        (r"\boxed{ 34 }.", "34", 1.0),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{1/2}", "0.5", 1.0),
        (r"\boxed{\text{10}}", "10", 1.0),
        (r"\boxed{90^\circ}", "90", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        ("Answer: -7", "-7", 1.0),
        (r"\boxed{35}", "34", 0.0),
        (r"\boxed{x+1}", "1+x", 0.0),  # not a symbolic checker
        ("34", "34", 0.0),  # no boxed or Answer: line
    ],
)
def test_math_answer_reward(completion, reference, reward):
    assert math_answer_reward([completion], answer=[reference]) == [reward]


def test_resolve_reward():
    assert resolve_reward("math_answer") is REWARDS["math_answer"]
    assert resolve_reward("tike_trl.rewards.exact_number_reward") is exact_number_reward
    with pytest.raises(InputError, match="unknown reward 'accuracy'"):
        resolve_reward("accuracy")
    with pytest.raises(InputError, match="could not be imported"):
        resolve_reward("no_such_module.reward")

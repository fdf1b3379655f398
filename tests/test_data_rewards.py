"""The embedded arithmetic task, dataset loading in TRL's conventions (every column kept, local
files, verl-style references, TRL's dataset mixtures), and the rewards (math-verify's table)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from trl import DatasetMixtureConfig

from tike_trl import rewards
from tike_trl.errors import InputError
from tike_trl.rewards import (
    REWARDS,
    exact_number_reward,
    final_math_answer,
    final_number,
    math_answer_reward,
    resolve_reward,
    same_math_answer,
)
from tike_trl.scripts.data import (
    ARITHMETIC_TEMPLATE,
    arithmetic_dataset,
    arithmetic_splits,
    check_reward_columns,
    load_splits,
    split,
    with_conversational_prompt,
)


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
    splits = arithmetic_splits(n=50, seed=3)
    assert (len(splits["train"]), len(splits["test"])) == (50, 5)


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(max_operand=0), dict(operations="/"), dict(operations="")])
def test_arithmetic_dataset_rejects(kwargs):
    with pytest.raises(InputError, match="arithmetic task"):
        arithmetic_dataset(**kwargs)


def test_local_jsonl_keeps_every_column_unchanged(tmp_path):
    """String prompts become one user message; every other column, answers included, is untouched."""
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": f"what is {i} + 1 ?", "answer": i + 1, "extra": "x"}) for i in range(3))
    )
    data = with_conversational_prompt(split(load_splits(str(path)), "train", "data"))
    assert data[0]["prompt"] == [{"role": "user", "content": "what is 0 + 1 ?"}]
    assert data["answer"] == [1, 2, 3] and data["extra"] == ["x"] * 3  # no renaming, no casting


def test_other_prompt_column_and_chat_prompts(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"question": [{"role": "user", "content": "2 + 2 ?"}], "solution": "4"}]))
    data = with_conversational_prompt(load_splits(str(path))["train"], "data", prompt_column="question")
    assert data[0]["prompt"] == data[0]["question"] == [{"role": "user", "content": "2 + 2 ?"}]
    assert data[0]["solution"] == "4"


def test_trl_dataset_mixture(tmp_path):
    """TRL's `datasets:` mixture (DatasetMixtureConfig, get_dataset), with its test split."""
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "solution": str(i)}) for i in range(10)))
    mixture = DatasetMixtureConfig(datasets=[{"path": "json", "data_files": str(path)}], test_split_size=0.2)
    splits = load_splits(mixture=mixture)
    assert (len(splits["train"]), len(splits["test"])) == (8, 2)
    with pytest.raises(InputError, match=r"no 'validation' split for evaluation \(splits: train, test\)"):
        split(splits, "validation", "mixture", " for evaluation")


def test_streamed_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(3)))
    data = with_conversational_prompt(load_splits(str(path), streaming=True)["train"])
    assert next(iter(data))["prompt"] == [{"role": "user", "content": "q0"}]
    check_reward_columns(data, [math_answer_reward], None, "stream")


def _verl_rows() -> Dataset:
    # the layout of BytedTsinghua-SIA/DAPO-Math-17k
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "Find x."}],
                "data_source": "math_dapo",
                "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
            }
        ]
    )


def test_verl_style_reference_is_found():
    data = _verl_rows()
    check_reward_columns(data, [math_answer_reward], None, "verl")
    row = data[0]
    kwargs = {"reward_model": [row["reward_model"]], "data_source": [row["data_source"]]}
    assert math_answer_reward([r"\boxed{34}"], **kwargs) == [1.0]


def test_reference_column_order_and_answer_column():
    both = {"solution": ["1"], "answer": ["2"]}
    assert math_answer_reward([r"\boxed{1}"], **both) == [1.0]  # TRL's `solution` first
    assert math_answer_reward([r"\boxed{2}"], answer_column="answer", **both) == [1.0]
    with pytest.raises(InputError, match="no reference answers"):
        math_answer_reward([r"\boxed{1}"], result=["1"])


def test_check_reward_columns():
    data = Dataset.from_list([{"prompt": "q", "result": "1", "solution": "1"}])
    check_reward_columns(data, [resolve_reward("accuracy_reward"), math_answer_reward, "org/reward-model"], None, "d")
    check_reward_columns(data, [math_answer_reward], "result", "d")
    with pytest.raises(InputError, match="no reference column for math_answer_reward: it needs 'missing'"):
        check_reward_columns(data, [math_answer_reward], "missing", "d")
    with pytest.raises(InputError, match="column 'reward_model' has no 'ground_truth' field"):
        check_reward_columns(
            Dataset.from_list([{"prompt": "q", "reward_model": {"style": "x"}}]), [math_answer_reward], None, "d"
        )


@pytest.mark.parametrize(
    "row,missing", [({"question": "q", "answer": "1"}, "'prompt'"), ({"prompt": "", "answer": "1"}, None)]
)
def test_prompt_checks_are_one_clear_line(tmp_path, row, missing):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row))
    data = load_splits(str(path))["train"]
    if missing is None:
        with_conversational_prompt(data)  # an empty string prompt is still a prompt
        return
    with pytest.raises(InputError) as err:
        with_conversational_prompt(data, "bad")
    message = str(err.value)
    assert missing in message and "columns:" in message and "\n" not in message


def test_missing_file_and_unknown_local_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_splits(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="could not be loaded"):
        load_splits(str(tmp_path / "empty"))


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
    assert exact_number_reward(chat, answer=[9]) == [1.0]  # a numeric column, as a JSON file gives it


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


# (completion, reference, reward): math_answer's behaviour, through math-verify. The regex
# comparison that came before it got 26 of these 41 right (16 of the 31 correct answers).
MATH_TABLE = [
    # the cases the regex comparison missed
    (r"so \boxed{\frac12}", "1/2", 1.0),
    (r"\boxed{x+1}", "1+x", 1.0),
    (r"\boxed{2\sqrt2}", r"\sqrt8", 1.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{\text{(A)}}", "A", 1.0),
    (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", 1.0),
    # integers, the Answer: line, the last answer
    (r"\boxed{34}", "34", 1.0),
    (r"\boxed{ 34 }.", "34", 1.0),
    ("Let me think.\nAnswer: 34", "34", 1.0),
    ("Answer: -7", "-7", 1.0),
    (r"first \boxed{3}, then \boxed{4}", "4", 1.0),
    (r"\boxed{5} but wait.\nAnswer: 6", "6", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    # fractions and decimals
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", "0.5", 1.0),
    ("Answer: $\\frac{3}{4}$", "0.75", 1.0),
    (r"\boxed{1.50}", "1.5", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", 1.0),
    # expressions
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    # percentages, units, degrees
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{25\%}", "0.25", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{12 \text{ meters}}", "12", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    # intervals and sets
    (r"\boxed{(1, 3]}", "(1,3]", 1.0),
    (r"\boxed{[2, \infty)}", r"[2,\infty)", 1.0),
    (r"\boxed{1, 2, 3}", r"\{3,2,1\}", 1.0),
    # multiple choice
    (r"\boxed{(B)}", "B", 1.0),
    (r"\boxed{C}", r"\text{(C)}", 1.0),
    # wrong answers
    (r"\boxed{35}", "34", 0.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (r"\boxed{0.3333}", r"\frac13", 0.0),
    (r"\boxed{x-1}", "x+1", 0.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    (r"\boxed{(1,3)}", "[1,3]", 0.0),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0.0),
    (r"\boxed{B}", "A", 0.0),
    (r"\boxed{4}, no: \boxed{3}", "4", 0.0),
    ("34", "34", 0.0),  # no \boxed{} and no Answer: line
]


@pytest.mark.parametrize("completion,reference,reward", MATH_TABLE)
def test_math_answer_table(completion, reference, reward):
    assert math_answer_reward([completion], solution=[reference]) == [reward]
    chat = [[{"role": "assistant", "content": completion}]]
    assert math_answer_reward(chat, answer=[reference]) == [reward]


def test_math_answer_table_size():
    assert len(MATH_TABLE) >= 30 and {r for *_, r in MATH_TABLE} == {0.0, 1.0}


def test_regex_fallback_where_math_verify_cannot_parse(monkeypatch):
    assert same_math_answer("@", "@") and not same_math_answer("@", "#")  # math-verify parses neither
    monkeypatch.setattr(rewards, "_math_verify_parse", lambda text: [])
    assert same_math_answer(r"\dfrac{1}{2}", "0.5") and same_math_answer(r"\text{10}", "10")
    assert not same_math_answer("x+1", "1+x")  # no symbolic comparison without math-verify


def test_resolve_reward():
    from trl.rewards import accuracy_reward

    assert resolve_reward("math_answer") is REWARDS["math_answer"]
    assert resolve_reward("tike_trl.rewards.exact_number_reward") is exact_number_reward
    assert resolve_reward("trl.rewards.accuracy_reward") is resolve_reward("accuracy_reward") is accuracy_reward
    with pytest.raises(InputError, match="unknown reward 'accuracy'"):
        resolve_reward("accuracy")
    with pytest.raises(InputError, match="could not be imported"):
        resolve_reward("no_such_module.reward")

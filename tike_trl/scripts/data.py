"""Training data: the embedded arithmetic task, generated in code, and user datasets with a
prompt and an answer per row (a local JSON/JSONL file or a Hugging Face Hub dataset).

Every dataset comes out in TRL's conversational format: `prompt` is a list of chat messages, so
TRL applies the model's chat template, and `answer` is a string that the reward functions in
`tike_trl.rewards` receive as a keyword argument.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, Value

from ..errors import InputError

ARITHMETIC_TEMPLATE = "What is {question}? Reply with the number only."


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 9, operations: str = "+") -> list[tuple[str, int]]:
    """`n` problems "a <op> b" with operands in [0, max_operand], and their integer answers."""
    if n < 1 or max_operand < 1:
        raise InputError(f"arithmetic task: n={n} and max_operand={max_operand} must both be >= 1")
    unknown = set(operations) - set("+-*")
    if not operations or unknown:
        raise InputError(f"arithmetic task: operations={operations!r}: use any of '+', '-', '*'")
    solve = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(operations)
        problems.append((f"{a} {op} {b}", solve[op](a, b)))
    return problems


def arithmetic_dataset(n: int = 2000, seed: int = 0, max_operand: int = 9, operations: str = "+") -> Dataset:
    """The embedded task: chat prompts asking for the number only, with the exact answer.

    SmolLM2-135M-Instruct gets about a quarter of single-digit sums right at temperature 1 (and
    much less with two-digit operands), so the reward has room to rise within minutes on a CPU.
    """
    problems = arithmetic_problems(n, seed, max_operand, operations)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": ARITHMETIC_TEMPLATE.format(question=q)}] for q, _ in problems],
            "answer": [str(a) for _, a in problems],
        }
    )


def load_prompt_answer_dataset(
    source: str,
    split: str = "train",
    config: str | None = None,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
) -> Dataset:
    """Load `source` (a local .json/.jsonl file, a local dataset folder, or a Hub id) as prompt/answer rows.

    Columns are renamed to `prompt` and `answer`; verl-style datasets such as DAPO-Math-17k, whose
    answer sits in `reward_model.ground_truth`, are recognised. A plain-string prompt becomes one
    user message, so that instruct models see their chat template.
    """
    from datasets import load_dataset

    path = Path(source).expanduser()
    try:
        if path.suffix in (".json", ".jsonl"):
            if not path.is_file():
                raise InputError(f"dataset {source!r}: no such file")
            dataset = load_dataset("json", data_files=str(path), split="train")
        else:
            dataset = load_dataset(str(path) if path.exists() else source, config, split=split)
    except InputError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid...)
        raise InputError(f"dataset {source!r} could not be loaded: {_first_line(err)}") from err
    return as_prompt_answer(dataset, source, prompt_column, answer_column)


def as_prompt_answer(
    dataset: Dataset, source: str = "dataset", prompt_column: str = "prompt", answer_column: str = "answer"
) -> Dataset:
    """Check and normalise a dataset to conversational `prompt` and string `answer` columns."""
    columns = dataset.column_names
    if answer_column not in columns and answer_column == "answer" and "reward_model" in columns:
        dataset = dataset.map(lambda row: {"answer": str(row["reward_model"]["ground_truth"])})
    else:
        dataset = _rename(dataset, answer_column, "answer")
    dataset = _rename(dataset, prompt_column, "prompt")
    missing = [
        wanted
        for wanted, name in (("prompt", prompt_column), ("answer", answer_column))
        if wanted not in dataset.column_names
    ]
    if missing:
        raise InputError(
            f"dataset {source!r} has no {' or '.join(repr(m) for m in missing)} column "
            f"(columns: {', '.join(columns)}); it needs one prompt and one answer per row"
        )
    if len(dataset) == 0:
        raise InputError(f"dataset {source!r} has no rows")
    first = dataset[0]["prompt"]
    if isinstance(first, str):
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    elif not (isinstance(first, list) and first and isinstance(first[0], dict) and "content" in first[0]):
        raise InputError(f"dataset {source!r}: 'prompt' must be a string or a list of chat messages")
    if not isinstance(dataset[0]["answer"], str):
        dataset = dataset.cast_column("answer", Value("string"))
    return dataset


def _rename(dataset: Dataset, name: str, target: str) -> Dataset:
    if name == target or name not in dataset.column_names:
        return dataset
    if target in dataset.column_names:
        dataset = dataset.remove_columns(target)
    return dataset.rename_column(name, target)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]

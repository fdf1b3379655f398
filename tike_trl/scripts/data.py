"""Training data, in TRL's conventions: the embedded arithmetic task, generated in code, or any
dataset TRL's GRPO script loads (`dataset_name`, or a `datasets:` mixture through TRL's
`DatasetMixtureConfig` and `get_dataset`), plus local .json/.jsonl/.csv/.parquet files.

Every column reaches the reward functions unchanged, as a keyword argument (TRL passes all but
the prompt). The one change: the prompt becomes conversational (a plain-string prompt becomes one
user message), so that TRL applies the model's chat template, and so that completions are
messages, as `trl.rewards.accuracy_reward` expects.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset

from ..errors import InputError
from ..rewards import REFERENCE_COLUMNS, REWARDS, find_reference_column

ARITHMETIC_TEMPLATE = "What is {question}? Reply with the number only."
# local files by extension, and the `datasets` builder that reads them
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# keyword arguments GRPOTrainer passes to every reward function besides the dataset's columns
TRAINER_REWARD_KWARGS = {
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
}


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
    """The embedded task: chat prompts asking for the number only, with the exact `answer`.

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


def arithmetic_splits(n: int = 2000, seed: int = 0, max_operand: int = 9, operations: str = "+") -> DatasetDict:
    """The embedded task as `train` (n rows) and `test` (n // 10 rows, another seed) splits."""
    return DatasetDict(
        {
            "train": arithmetic_dataset(n, seed, max_operand, operations),
            "test": arithmetic_dataset(max(1, n // 10), seed + 1, max_operand, operations),
        }
    )


def load_splits(
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    streaming: bool = False,
    mixture=None,
) -> DatasetDict:
    """All splits of the dataset, as TRL's GRPO script loads them: a `datasets:` mixture (TRL's
    `DatasetMixtureConfig`) wins over `dataset_name`, which is a Hub id, a local dataset folder
    or a local .json/.jsonl/.csv/.parquet file (one `train` split)."""
    from datasets import load_dataset
    from trl import get_dataset

    source = "the datasets mixture" if mixture is not None and mixture.datasets else repr(dataset_name)
    try:
        if mixture is not None and mixture.datasets:
            return get_dataset(mixture)
        path = Path(dataset_name).expanduser()
        if path.suffix in FILE_BUILDERS:
            if not path.is_file():
                raise InputError(f"dataset {dataset_name!r}: no such file")
            return load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), streaming=streaming)
        return load_dataset(str(path) if path.exists() else dataset_name, dataset_config, streaming=streaming)
    except InputError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid...)
        raise InputError(f"dataset {source} could not be loaded: {_first_line(err)}") from err


def split(splits: DatasetDict, name: str, source: str, why: str = "") -> Dataset:
    """One split, or one line naming the splits there are."""
    if name not in splits:
        raise InputError(f"dataset {source} has no {name!r} split{why} (splits: {', '.join(splits)})")
    return splits[name]


def with_conversational_prompt(dataset: Dataset, source: str = "dataset", prompt_column: str = "prompt") -> Dataset:
    """`dataset` with a conversational `prompt` column, taken from `prompt_column`; every other
    column (and `prompt_column` itself) unchanged."""
    columns = _column_names(dataset)
    if prompt_column not in columns:
        raise InputError(
            f"dataset {source} has no {prompt_column!r} column (columns: {', '.join(columns)}); "
            "it needs a prompt per row (prompt_column names another column)"
        )
    first = _first_row(dataset, source)[prompt_column]
    if isinstance(first, str):
        return dataset.map(lambda row: {"prompt": [{"role": "user", "content": row[prompt_column]}]})
    if not (isinstance(first, list) and first and isinstance(first[0], dict) and "content" in first[0]):
        raise InputError(f"dataset {source}: {prompt_column!r} must be a string or a list of chat messages")
    if prompt_column != "prompt":
        dataset = dataset.map(lambda row: {"prompt": row[prompt_column]})
    return dataset


def check_reward_columns(dataset: Dataset, reward_funcs: Sequence, answer_column: str | None, source: str) -> None:
    """One line before training, instead of a TypeError or KeyError at the first step, when a
    reward needs a column the dataset lacks: ours need a reference column (`answer_column`, or one
    of `tike_trl.rewards.REFERENCE_COLUMNS`), and any reward's required parameters must be columns."""
    columns = _column_names(dataset)
    for func in reward_funcs:
        if isinstance(func, str):  # a reward model
            continue
        name = getattr(func, "__name__", repr(func))
        if getattr(func, "func", func) in REWARDS.values():  # ours, maybe with answer_column bound
            column = find_reference_column(columns, answer_column)
            if column is None:
                wanted = repr(answer_column) if answer_column else " or ".join(map(repr, REFERENCE_COLUMNS))
                raise InputError(
                    f"dataset {source} has no reference column for {name}: it needs {wanted} "
                    f"(columns: {', '.join(columns)}); set answer_column to the one that holds the answers"
                )
            top, *path = column.split(".")
            value = _first_row(dataset, source)[top]
            for key in path:
                if not isinstance(value, dict) or key not in value:
                    raise InputError(f"dataset {source}: column {top!r} has no {key!r} field (answer_column={column})")
                value = value[key]
            continue
        try:
            parameters = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            continue
        needed = [
            p.name
            for p in parameters
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in TRAINER_REWARD_KWARGS
        ]
        missing = [p for p in needed if p not in columns]
        if missing:
            raise InputError(
                f"reward {name} reads the dataset column {' and '.join(repr(m) for m in missing)}, which dataset "
                f"{source} lacks (columns: {', '.join(columns)}); TRL passes each column under its own name"
            )


def _column_names(dataset: Dataset) -> list[str]:
    names = dataset.column_names
    if names is None and isinstance(dataset, IterableDataset):  # a stream with unknown features
        names = list(_first_row(dataset, "stream"))
    return list(names)


def _first_row(dataset: Dataset, source: str) -> dict:
    try:
        return dataset[0] if isinstance(dataset, Dataset) else next(iter(dataset))
    except (IndexError, StopIteration):
        raise InputError(f"dataset {source} has no rows") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]

r"""Verifiable rewards: 1.0 when the completion's final answer equals the reference answer, else 0.0.

Reward functions follow TRL's convention: `f(completions, **kwargs) -> list[float]`, where the
trainer passes every dataset column (but the prompt) as a keyword argument, unchanged, and
completions are strings or (conversational) lists of messages. Ours read the reference from the
column `answer_column` names (a dotted name reads inside a struct column, as verl's
`reward_model.ground_truth`); left unset, from the first of `REFERENCE_COLUMNS` the dataset has.
Select them by name (`reward_funcs: [math_answer]`), with TRL's own by their names in TRL's GRPO
script (`accuracy_reward`, ...) or any function by its dotted import path.

`math_answer` compares the final `\boxed{}` (or DAPO's `Answer:` line) with the reference through
math-verify, the checker TRL's `accuracy_reward` uses: `\frac12` = `1/2`, `x+1` = `1+x`,
`2\sqrt2` = `\sqrt8`, `x = 3` = `3`, `\text{(A)}` = `A`, sets in any order, intervals, units and
percentages. Where math-verify cannot parse one side, a normalised string or number comparison
decides instead.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction

from .errors import InputError

RewardFunc = Callable[..., list[float]]

# where our rewards look for the reference when `answer_column` is unset: TRL's convention
# (`solution`, read by trl.rewards.accuracy_reward), ours, and verl's (DAPO-Math-17k)
REFERENCE_COLUMNS = ("solution", "answer", "reward_model.ground_truth")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)


def completion_text(completion: str | list[dict]) -> str:
    """The generated text of one completion (the last message's content if conversational)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def find_reference_column(columns: Iterable[str], answer_column: str | None = None) -> str | None:
    """`answer_column` if its top-level column is among `columns`, else (unset) the first of
    `REFERENCE_COLUMNS` that is; None if there is none."""
    columns = set(columns)
    for name in [answer_column] if answer_column else REFERENCE_COLUMNS:
        if name.split(".")[0] in columns:
            return name
    return None


def references(columns: Mapping[str, list], answer_column: str | None = None) -> list[str]:
    """The reference answers, as strings, from the reward function's keyword arguments."""
    name = find_reference_column(columns, answer_column)
    if name is None:
        wanted = repr(answer_column) if answer_column else ", ".join(repr(c) for c in REFERENCE_COLUMNS)
        raise InputError(
            f"no reference answers: the reward needs a dataset column {wanted} (answer_column names another one); "
            f"it got {', '.join(sorted(columns)) or 'none'}"
        )
    top, *path = name.split(".")
    values = columns[top]
    for key in path:
        values = [value[key] for value in values]
    return [str(value) for value in values]


def final_number(text: str) -> str | None:
    """The last number written in `text` ("7 + 5 = 12." -> "12"), thousands separators dropped."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def exact_number_reward(completions: list, *, answer_column: str | None = None, **kwargs) -> list[float]:
    """Exact match of the completion's final number with the reference (the embedded arithmetic task)."""
    return [
        float(_same_number(final_number(completion_text(c)), a))
        for c, a in zip(completions, references(kwargs, answer_column))
    ]


def boxed_answers(text: str) -> list[tuple[int, str]]:
    r"""(position, content) of every `\boxed{...}` in `text`, nested braces included."""
    found = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append((match.start(), text[start:i]))
                break
    return found


def final_math_answer(text: str) -> str | None:
    r"""The answer written last: the last `\boxed{...}`, or an "Answer: ..." line (DAPO-Math's
    prompt asks for one) if that comes later."""
    candidates = boxed_answers(text)
    candidates += [(m.start(), m.group(1)) for m in _ANSWER_LINE.finditer(text)]
    if not candidates:
        return None
    answer = max(candidates)[1]
    return boxed_answers(answer)[-1][1] if boxed_answers(answer) else answer  # "Answer: \boxed{5}"


def normalize_math_answer(text: str) -> str:
    r"""Drop LaTeX that does not change the value: `$`, `\left`/`\right`, spacing commands,
    `\text{}`, `\dfrac`, degree and percent signs, a trailing period, all spaces."""
    text = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", text)
    for old, new in (
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\%", ""),
        ("%", ""),
        ("$", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
    ):
        text = text.replace(old, new)
    return re.sub(r"\s+", "", text).rstrip(".")


def same_math_answer(given: str, reference: str) -> bool:
    r"""Whether the answer `given` (the extracted text, e.g. `\frac12`) equals `reference`: by
    math-verify when it parses both, else by `normalize_math_answer` and `_same_number`."""
    parsed = [_math_verify_parse(text) for text in (reference, given)]
    if all(parsed):
        from math_verify import verify

        return bool(verify(parsed[0], parsed[1], timeout_seconds=_timeout(5)))
    given, reference = normalize_math_answer(given), normalize_math_answer(reference)
    return given == reference or _same_number(given, reference)


def math_answer_reward(completions: list, *, answer_column: str | None = None, **kwargs) -> list[float]:
    r"""Math answer check for DAPO-Math-style data: the final `\boxed{}` (or "Answer:") value
    equals the reference by math-verify (symbolic: `x+1` = `1+x`), or, where math-verify cannot
    parse one side, after LaTeX normalisation or numerically. No final answer: 0.0."""
    rewards = []
    for completion, reference in zip(completions, references(kwargs, answer_column)):
        given = final_math_answer(completion_text(completion))
        rewards.append(0.0 if given is None else float(same_math_answer(given, reference)))
    return rewards


def _timeout(seconds: int) -> int | None:
    # math-verify times out through signal.alarm, which works only in the main thread; elsewhere,
    # as trl.rewards.accuracy_reward does, no timeout, and no warning about it on every call
    if threading.current_thread() is threading.main_thread():
        return seconds
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return None


def _math_verify_parse(text: str) -> list:
    """math-verify's parse of one bare answer, or [] if it yields no mathematical object."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = text.strip().strip("$").strip().rstrip(".")
    if not text:
        return []
    parsed = parse(
        f"${text}$",  # as math, so that LaTeX without its delimiters is read whole
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=_timeout(5),
    )
    return parsed if any(not isinstance(item, str) for item in parsed) else []


def _as_number(text: str | None) -> Fraction | None:
    if text is None:
        return None
    text = text.replace(",", "")
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text)
    if frac:
        text = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _same_number(given: str | None, reference: str) -> bool:
    a, b = _as_number(given), _as_number(str(reference).strip())
    return a is not None and a == b


REWARDS: dict[str, RewardFunc] = {"exact_number": exact_number_reward, "math_answer": math_answer_reward}
# TRL's rewards by the names its GRPO script gives them (get_soft_overlong_punishment needs arguments)
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")


def resolve_reward(name: str) -> RewardFunc:
    """A reward by its name in `REWARDS` or `TRL_REWARDS`, or by a dotted import path
    ("my_package.rewards.my_reward", "trl.rewards.accuracy_reward")."""
    if name in REWARDS:
        return REWARDS[name]
    if name in TRL_REWARDS:
        name = f"trl.rewards.{name}"
    module, _, attr = name.rpartition(".")
    if not module:
        raise InputError(
            f"unknown reward {name!r}: use one of {', '.join([*REWARDS, *TRL_REWARDS])} or a dotted import path"
        )
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise InputError(f"reward {name!r} could not be imported: {err}") from err

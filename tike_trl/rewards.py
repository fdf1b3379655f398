"""Verifiable rewards: 1.0 when the completion's final answer equals the dataset's `answer`, else 0.0.

Reward functions follow TRL's signature `f(completions, answer, **kwargs) -> list[float]`;
completions are strings or (conversational) lists of messages. Select them by name in a recipe
config (`reward_funcs: [math_answer]`) or give a dotted import path to your own.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction

from .errors import InputError

RewardFunc = Callable[..., list[float]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)


def completion_text(completion: str | list[dict]) -> str:
    """The generated text of one completion (the last message's content if conversational)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def final_number(text: str) -> str | None:
    """The last number written in `text` ("7 + 5 = 12." -> "12"), thousands separators dropped."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def exact_number_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Exact match of the completion's final number with the answer (the embedded arithmetic task)."""
    return [float(_same_number(final_number(completion_text(c)), a)) for c, a in zip(completions, answer)]


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


def math_answer_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    r"""Math answer check for DAPO-Math-style data: the final `\boxed{}` (or "Answer:") value equals
    the reference after LaTeX normalisation, or numerically (integers, decimals, a/b, \frac{a}{b}).
    Not a symbolic checker: "x+1" and "1+x" differ."""
    rewards = []
    for completion, reference in zip(completions, answer):
        given = final_math_answer(completion_text(completion))
        if given is None:
            rewards.append(0.0)
            continue
        given, reference = normalize_math_answer(given), normalize_math_answer(str(reference))
        rewards.append(float(given == reference or _same_number(given, reference)))
    return rewards


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


def resolve_reward(name: str) -> RewardFunc:
    """A reward by its name in `REWARDS` or by a dotted import path ("my_package.rewards.my_reward")."""
    if name in REWARDS:
        return REWARDS[name]
    module, _, attr = name.rpartition(".")
    if not module:
        raise InputError(f"unknown reward {name!r}: use one of {', '.join(REWARDS)} or a dotted import path")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise InputError(f"reward {name!r} could not be imported: {err}") from err

"""Synthetic GSM8K-shaped arithmetic problems and their rewards.

A problem is a one-sentence word problem with a single integer answer, plus a GSM8K-style reference
solution (``"3 + 4 = 7\\n#### 7"``). The reward is what a GSM8K recipe uses, exact match on the final
number of the response (1.0 or 0.0, no partial credit), plus a small, documented format reward:

``format_reward = FORMAT_WEIGHT · (answer characters in the response text) / (characters in it)``

with answer characters the digits and ``#+-*/=.,`` (what a GSM8K answer line is made of). A tiny random
model never solves a problem, so exact match alone is 0 for every sample and GRPO's group-normalised
advantages are all zero: no gradient, no weight change, nothing to sync. The format reward (at most 0.1,
so one correct answer always outweighs it) is a ratio of two counts that differ between sampled
responses of the same prompt, which keeps the advantages non-zero. The run gates on that.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FORMAT_WEIGHT = 0.1
ANSWER_CHARS = frozenset("0123456789#+-*/=.,")

_NAMES = ("Tom", "Ana", "Li", "Sam", "Mia", "Raj")
_THINGS = ("apples", "books", "coins", "cards", "pens")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One word problem: the question, the integer answer and a GSM8K-style solution."""

    question: str
    answer: int
    solution: str


def make_problems(n: int, seed: int) -> list[Problem]:
    """``n`` deterministic problems (addition, subtraction, multiplication with small numbers)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        kind = rng.choice(("add", "sub", "mul"))
        if kind == "add":
            q, ans, work = f"{name} has {a} {thing} and gets {b} more. How many now?", a + b, f"{a} + {b}"
        elif kind == "sub":
            a += b
            q, ans, work = f"{name} has {a} {thing} and gives {b} away. How many left?", a - b, f"{a} - {b}"
        else:
            q, ans, work = f"{name} buys {a} bags of {b} {thing}. How many {thing}?", a * b, f"{a} * {b}"
        out.append(Problem(q, ans, f"{work} = {ans}\n#### {ans}"))
    return out


def extract_final_number(text: str) -> str | None:
    """The number after the last ``####`` if there is one, else the last number in ``text``."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def exact_match(text: str, answer: int) -> float:
    """1.0 when the final number of ``text`` equals ``answer`` exactly, else 0.0."""
    got = extract_final_number(text)
    if got is None:
        return 0.0
    try:
        return 1.0 if float(got) == float(answer) else 0.0
    except ValueError:
        return 0.0


def format_reward(text: str) -> float:
    """``FORMAT_WEIGHT`` times the fraction of answer characters in ``text`` (0 for an empty one)."""
    if not text:
        return 0.0
    return FORMAT_WEIGHT * sum(1 for c in text if c in ANSWER_CHARS) / len(text)


def reward(text: str, answer: int) -> tuple[float, float, float]:
    """``(total, exact_match, format)`` of one response text."""
    em = exact_match(text, answer)
    fmt = format_reward(text)
    return em + fmt, em, fmt

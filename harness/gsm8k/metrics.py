"""slime's metric lines -> JSON.

slime prints one line per training step, rollout and evaluation, a Python ``dict`` after a tag::

    step 0: {'train/loss': 0.0123, 'train/ppo_kl': 0.0, 'train/train_rollout_logprob_abs_diff': 0.004, ...}
    rollout 0: {'rollout/raw_reward': 0.84, 'rollout/response_len/mean': 212.5, ...}
    eval 0: {'eval/gsm8k': 0.86}

possibly behind a logger or Ray prefix (``(MegatronTrainRayActor pid=123) [time] file.py:12 - step 0: {``).
Values are numbers, ``nan``/``inf``, or wrapped numbers (``np.float64(0.5)``, ``tensor(0.5)``). The dict is
read with a small tokenizer, never ``eval``: a value that is not a number is kept as text and reported as a
problem (the gates require every metric finite). ``perf N:`` lines are parsed too (reported, not gated).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("step", "rollout", "eval", "perf")
_HEAD = re.compile(r"(?<![\w/])(?P<kind>step|rollout|eval|perf) (?P<index>\d+): \{")
_NUMBER = re.compile(
    r"^(?:(?:np|numpy)\.\w+\(|torch\.tensor\(|tensor\()?\s*(?P<num>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf|infinity))\s*(?:,[^)]*)?\)?$",
    re.IGNORECASE,
)


@dataclass
class ParsedMetrics:
    """Metrics by kind and index (``{"step": {0: {"train/ppo_kl": 0.0, ...}}}``) plus parse problems."""

    series: dict[str, dict[int, dict[str, Any]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    problems: list[str] = field(default_factory=list)
    lines: int = 0

    def get(self, kind: str, index: int, key: str) -> Any:
        """One value, or None when absent."""
        return self.series[kind].get(index, {}).get(key)

    def values(self, kind: str, key: str) -> list[tuple[int, Any]]:
        """``(index, value)`` of ``key`` over every record of ``kind``, in index order."""
        return [(i, rec[key]) for i, rec in sorted(self.series[kind].items()) if key in rec]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""

        def clean(value: Any) -> Any:
            return value if not isinstance(value, float) or math.isfinite(value) else str(value)

        return {
            "series": {
                k: {str(i): {key: clean(val) for key, val in rec.items()} for i, rec in sorted(v.items())}
                for k, v in self.series.items()
            },
            "problems": list(self.problems),
            "metric_lines": self.lines,
        }


def parse_value(text: str) -> float | str:
    """A metric value as float (``nan``/``inf`` included), or the raw text if it is not a number."""
    m = _NUMBER.match(text.strip())
    if m is None:
        return text.strip()
    return float(m.group("num"))


def _dict_body(line: str, start: int) -> str | None:
    """The text between the ``{`` at ``start - 1`` and its matching ``}`` (None when unterminated)."""
    depth = 1
    quote = None
    for i in range(start, len(line)):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return line[start:i]
    return None


def _split_pairs(body: str) -> list[str]:
    """Top-level ``key: value`` items of a dict body (commas inside quotes or parentheses kept)."""
    items, depth, quote, cur = [], 0, None, []
    for ch in body:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        items.append("".join(cur))
    return items


def parse_line(line: str, where: str = "") -> tuple[str, int, dict[str, Any], list[str]] | None:
    """``(kind, index, metrics, problems)`` of one metric line, or None if the line holds none."""
    m = _HEAD.search(line)
    if m is None:
        return None
    kind, index = m.group("kind"), int(m.group("index"))
    body = _dict_body(line, m.end())
    if body is None:
        return kind, index, {}, [f"{where}{kind} {index}: unterminated metric dict"]
    metrics: dict[str, Any] = {}
    problems: list[str] = []
    for item in _split_pairs(body):
        key, sep, value = item.partition(":")
        key = key.strip()
        if not sep or len(key) < 2 or key[0] not in "'\"" or key[-1] != key[0]:
            problems.append(f"{where}{kind} {index}: cannot read item {item.strip()!r}")
            continue
        metrics[key[1:-1]] = parse_value(value)
    return kind, index, metrics, problems


def parse_lines(lines: Iterable[str]) -> ParsedMetrics:
    """Parse a whole log; later records of the same kind and index update earlier ones."""
    out = ParsedMetrics()
    for n, line in enumerate(lines, 1):
        parsed = parse_line(line, f"line {n}: ")
        if parsed is None:
            continue
        kind, index, metrics, problems = parsed
        out.lines += 1
        out.series[kind].setdefault(index, {}).update(metrics)
        out.problems += problems
    return out


def is_finite_number(value: Any) -> bool:
    """True for a finite int/float (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

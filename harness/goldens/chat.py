"""Delegated family ``chat``: chat-template renders and loss masks, owned by ``gemma4.chat.goldens``.

That module keeps its own files and manifest under ``goldens/chat/`` and exposes
``record(goldens_dir, update=False) -> list[str]`` and ``check(goldens_dir) -> list[str]`` (problem lines).
This wrapper imports it lazily, so the other families keep working when it is absent: then the family is
reported as missing (a broken golden, exit 4), never as passing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from harness.goldens.outcome import INTEGRITY, PASS, REGRESSION, Outcome

NAME = "chat"
DESCRIPTION = "chat renders, input_ids and loss masks per corpus case and template (gemma4.chat.goldens)"
MODULE = "gemma4.chat.goldens"
SUBDIR = "chat"
_INTEGRITY_WORDS = ("missing", "corrupt", "unreadable", "schema_version", "not found")


def load_module() -> tuple[ModuleType | None, str | None]:
    """The chat goldens module, or ``None`` and why it cannot be imported."""
    try:
        module = importlib.import_module(MODULE)
    except Exception as exc:  # absent (ImportError) or broken (any error while importing)
        return None, f"{MODULE} cannot be imported ({type(exc).__name__}: {exc})"
    if not callable(getattr(module, "record", None)) or not callable(getattr(module, "check", None)):
        return None, f"{MODULE} has no record()/check() functions"
    return module, None


def directory(goldens_dir: Path) -> Path:
    """Where the chat goldens live."""
    return Path(goldens_dir) / SUBDIR


def exists(goldens_dir: Path) -> bool:
    """Whether chat goldens have been recorded in ``goldens_dir``."""
    return (directory(goldens_dir) / "manifest.json").exists()


def record(goldens_dir: Path, update: bool) -> list[str]:
    """Record through the chat module; an absent module raises :class:`InvalidInputError`."""
    from gemma4.errors import InvalidInputError

    module, why = load_module()
    if module is None:
        raise InvalidInputError(f"chat goldens: {why}")
    return [f"chat: {line}" for line in module.record(directory(goldens_dir), update=update)]


def check(goldens_dir: Path) -> Outcome:
    """One outcome for the whole family: its problems classified as broken goldens or regressions."""
    from gemma4.errors import InvalidInputError

    module, why = load_module()
    if module is None:
        return Outcome(NAME, INTEGRITY, f"family missing: {why}")
    try:
        problems = [str(p) for p in module.check(directory(goldens_dir))]
    except InvalidInputError as exc:
        problems = [str(exc)]
    if not problems:
        return Outcome(NAME, PASS, f"chat goldens in {directory(goldens_dir)} match", metrics={"problems": 0})
    broken = [p for p in problems if any(w in p.lower() for w in _INTEGRITY_WORDS)]
    status = INTEGRITY if broken else REGRESSION
    first = (broken or problems)[0]
    return Outcome(
        NAME,
        status,
        f"{len(problems)} problem(s), first: {first}",
        details=problems,
        metrics={"problems": len(problems)},
    )

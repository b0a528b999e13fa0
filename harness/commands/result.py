"""The one result protocol of every subcommand, and the one way a result leaves the CLI.

A command's ``run(args)`` returns a :class:`CommandResult`: ``exit_code`` (from :mod:`harness.exit_codes`),
``summary()`` (the text printed on stdout) and ``to_json()`` (what ``--json FILE`` receives). :func:`finish`
prints the summary, writes the JSON through the one strict atomic writer
(:func:`gemma4.atomic_io.atomic_write_json`: non-finite numbers become strings, never ``NaN`` literals) and
returns the exit code. Typed results (``ParityResult``, the goldens ``CheckReport``) implement the protocol
themselves; commands whose result is a plain report use :class:`Result`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from harness.exit_codes import EXIT_FAILED, EXIT_OK


@runtime_checkable
class CommandResult(Protocol):
    """What every subcommand returns."""

    @property
    def exit_code(self) -> int: ...

    def summary(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class Result:
    """A :class:`CommandResult` for a report dict and its rendered text."""

    payload: dict[str, Any]
    text: str
    code: int = EXIT_OK
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return self.code

    def summary(self) -> str:
        return self.text

    def to_json(self) -> dict[str, Any]:
        return self.payload

    @classmethod
    def verdict(cls, payload: dict[str, Any], text: str, passed: bool) -> Result:
        """0 when ``passed``, else 1 (the check ran and failed)."""
        return cls(payload, text, EXIT_OK if passed else EXIT_FAILED)


def finish(result: CommandResult | int, json_path: Path | None = None) -> int:
    """Print ``result.summary()``, write ``result.to_json()`` to ``json_path`` (strict JSON, atomically),
    return ``result.exit_code``. A bare int (a command that only prints) is returned as it is."""
    if isinstance(result, int):
        return result
    from gemma4.atomic_io import atomic_write_json

    if json_path is not None:
        atomic_write_json(Path(json_path), result.to_json())
    text = result.summary()
    if text:
        print(text, file=sys.stdout)
    return int(result.exit_code)

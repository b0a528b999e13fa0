"""Small file helpers: atomic writes and JSON reads whose errors name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemma4.atomic_io import atomic_write_text  # noqa: F401 - re-exported for gemma4.chat
from gemma4.errors import InvalidInputError


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises :class:`InvalidInputError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read {what} file: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{path}: invalid JSON in {what} file (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None

"""Small file helpers: atomic writes and JSON reads whose errors name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma4.atomic_io import atomic_write_text  # noqa: F401 - re-exported for gemma4.chat
from gemma4.safe_read import read_json as safe_read_json


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file strictly (:func:`gemma4.safe_read.read_json`: regular file, bounded size and depth,
    no NaN literals); every problem raises :class:`InvalidInputError` naming the file."""
    return safe_read_json(path, f"{what} file")

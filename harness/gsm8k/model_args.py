"""The model argument presets ``scripts/models/gemma4-*.sh`` (slime's ``MODEL_ARGS`` convention).

Each script defines one bash array, ``MODEL_ARGS=( --flag value ... )``, with plain words only (no
expansions), so it can be sourced by a launch script and read here without running bash.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from gemma4.errors import InvalidInputError

REPO = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = REPO / "scripts" / "models"
SCRIPTS = {
    "31b": "gemma4-31B.sh",
    "26b-a4b": "gemma4-26B-A4B.sh",
    "12b": "gemma4-12B.sh",
    "tiny": "gemma4-tiny.sh",
}
_ARRAY = re.compile(r"^MODEL_ARGS=\((?P<body>.*?)^\)", re.MULTILINE | re.DOTALL)


def script_path(variant: str) -> Path:
    """The preset script of ``variant`` (``31b``, ``26b-a4b``, ``12b``, ``tiny``)."""
    if variant not in SCRIPTS:
        raise InvalidInputError(f"unknown variant {variant!r}; choose from {sorted(SCRIPTS)}")
    return SCRIPTS_DIR / SCRIPTS[variant]


def read_model_args(path: Path) -> list[str]:
    """The words of the ``MODEL_ARGS`` array in ``path`` (comments dropped), as bash would expand it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the model argument script ({exc})") from exc
    m = _ARRAY.search(text)
    if m is None:
        raise InvalidInputError(f"{path}: no MODEL_ARGS=( ... ) array")
    body = m.group("body")
    if "$" in body or "`" in body:
        raise InvalidInputError(f"{path}: MODEL_ARGS must hold plain words (no $ or ` expansions)")
    return shlex.split(body, comments=True)

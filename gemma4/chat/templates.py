"""Loading and checking Gemma 4 chat templates.

:func:`load_template` reads a template file and checks that it writes the Gemma 4 turn markers
(:func:`check_gemma4_template`). Where templates come from is the caller's business: the released templates
(reference data that is not ours) are found by :mod:`harness.reference_data`, the project's own Gemma
4-format template ships in :mod:`harness.assets`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gemma4.chat.tokens import TURN_CLOSE, TURN_OPEN
from gemma4.errors import InvalidInputError


def check_gemma4_template(template: str, source: str) -> None:
    """Raise :class:`InvalidInputError` unless ``template`` writes the Gemma 4 turn markers."""
    missing = [marker for marker in (TURN_OPEN, TURN_CLOSE) if marker not in template]
    if missing:
        raise InvalidInputError(
            f"{source}: not a Gemma 4 chat template (it never writes {' or '.join(missing)}); "
            "pass a Gemma 4 template with --chat-template"
        )


def load_template(path: str | os.PathLike[str]) -> str:
    """Read a chat template file and check that it is a Gemma 4 template; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: chat template file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read chat template: {exc}") from None
    check_gemma4_template(text, str(path))
    return text


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

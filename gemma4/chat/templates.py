"""Locating and loading Gemma 4 chat templates.

The reference templates live outside the repository, in ``../shared/reference/gemma4/`` relative to the
repository root (CI checks the repository out with ``shared/`` beside it). ``GEMMA4_SHARED_DIR`` overrides
the location of that ``shared/`` directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gemma4.chat.tokens import TURN_CLOSE, TURN_OPEN
from gemma4.errors import InvalidInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR_ENV = "GEMMA4_SHARED_DIR"

#: Name -> file name of the two reference templates.
REFERENCE_TEMPLATES: dict[str, str] = {
    "standard": "chat_template.jinja",
    "interleaved_31b": "chat_template_31B_interleaved.jinja",
}


def reference_dir() -> Path:
    """The directory holding the reference templates (``<shared>/reference/gemma4``).

    ``$GEMMA4_SHARED_DIR`` names the ``shared/`` directory; a directory that holds the template files
    directly is accepted too.
    """
    env = os.environ.get(SHARED_DIR_ENV)
    shared = Path(env) if env else REPO_ROOT.parent / "shared"
    if env and not (shared / "reference" / "gemma4").is_dir() and (shared / "chat_template.jinja").is_file():
        return shared
    return shared / "reference" / "gemma4"


def reference_template_path(name: str) -> Path:
    """Path of a reference template by name (``standard`` or ``interleaved_31b``); raises if it is missing."""
    if name not in REFERENCE_TEMPLATES:
        raise InvalidInputError(
            f"unknown reference template {name!r}; expected one of {sorted(REFERENCE_TEMPLATES)}"
        )
    path = reference_dir() / REFERENCE_TEMPLATES[name]
    if not path.is_file():
        raise InvalidInputError(
            f"Gemma 4 reference chat template {path} not found: the shared reference data must sit beside the "
            f"repository (../shared/reference/gemma4/) or ${SHARED_DIR_ENV} must name the shared/ directory"
        )
    return path


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


def load_reference_template(name: str) -> str:
    """Text of a reference template by name."""
    return load_template(reference_template_path(name))


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

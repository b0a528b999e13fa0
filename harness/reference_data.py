"""The one lookup for reference data that is not ours (``shared/reference/``), and the repository root.

Reference data is read where it lives, in the ``shared/`` directory, never copied into the project:

* ``shared/reference/gemma4/``: the released Gemma 4 chat templates (``standard`` =
  ``chat_template.jinja``, ``interleaved_31b`` = ``chat_template_31B_interleaved.jinja``), needed only by code
  that explicitly asks for a released template (:func:`load_reference_template`; the chat goldens);
* ``shared/reference/slime/`` later.

Everything that only needs *a* Gemma 4 template uses the project's own (:mod:`harness.assets`).

Lookup (:func:`shared_dir`, :func:`reference_path`):

1. ``$GEMMA4_SHARED_DIR``, when set, names the ``shared/`` directory (the one holding ``reference/``);
2. otherwise ``<repository>/../shared`` (CI checks the repository out with ``shared/`` beside it).

Missing data raises :class:`ReferenceDataUnavailable` whose message names the file and says how to provide it.
Tests gate on it with the ``require_reference`` fixture (``tests/conftest.py``): skip with that message, or
fail with it when ``$GEMMA4_REQUIRE_SHARED=1`` (set by ``.ci/run``, where a skip would hide missing data).

This is harness code: the product (``gemma4/``) never looks outside its own package.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemma4.chat.templates import load_template
from gemma4.errors import InvalidInputError

#: The repository checkout this harness runs from.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Names the ``shared/`` directory that holds ``reference/`` (reference data that is not ours).
SHARED_DIR_ENV = "GEMMA4_SHARED_DIR"
#: When ``1``, tests that need reference data fail (instead of skipping) if it is missing; CI sets it.
REQUIRE_SHARED_ENV = "GEMMA4_REQUIRE_SHARED"

#: Name -> file name (under ``shared/reference/gemma4/``) of the two released templates.
REFERENCE_TEMPLATES: dict[str, str] = {
    "standard": "chat_template.jinja",
    "interleaved_31b": "chat_template_31B_interleaved.jinja",
}


class ReferenceDataUnavailable(InvalidInputError):
    """Reference data that is not ours (under ``shared/reference/``) is not available on this machine."""


def shared_dir() -> Path:
    """The ``shared/`` directory: ``$GEMMA4_SHARED_DIR`` if set, else ``<repository>/../shared``.

    The directory may not exist; :func:`reference_path` checks.
    """
    env = os.environ.get(SHARED_DIR_ENV)
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def reference_path(relative: str) -> Path:
    """Path of ``shared/reference/<relative>`` (e.g. ``gemma4/chat_template.jinja``, ``slime``).

    Raises :class:`ReferenceDataUnavailable`, naming the path looked at and how to provide it, if it does
    not exist.
    """
    path = shared_dir() / "reference" / relative
    if not path.exists():
        origin = (
            f"${SHARED_DIR_ENV}"
            if os.environ.get(SHARED_DIR_ENV)
            else "the default ../shared beside the clone"
        )
        raise ReferenceDataUnavailable(
            f"reference data not available: {path} does not exist (shared dir from {origin}); "
            f"set {SHARED_DIR_ENV}=/path/to/shared or put shared/ beside the clone "
            f"(it holds reference/{relative}, data that is not ours and is never copied into the repository)"
        )
    return path


def reference_dir() -> Path:
    """The directory of the released templates (``<shared>/reference/gemma4``); it may not exist."""
    return shared_dir() / "reference" / "gemma4"


def reference_template_path(name: str) -> Path:
    """Path of a released template by name (``standard`` or ``interleaved_31b``).

    Raises :class:`InvalidInputError` for an unknown name and :class:`ReferenceDataUnavailable` if the file
    is missing.
    """
    if name not in REFERENCE_TEMPLATES:
        raise InvalidInputError(
            f"unknown reference template {name!r}; expected one of {sorted(REFERENCE_TEMPLATES)}"
        )
    return reference_path(f"gemma4/{REFERENCE_TEMPLATES[name]}")


def load_reference_template(name: str) -> str:
    """Text of a released template by name (see :func:`reference_template_path` for the errors)."""
    return load_template(reference_template_path(name))

"""Data files that ship with the package (``[tool.setuptools.package-data]`` in pyproject.toml).

``gemma4_chat_template.jinja`` is the project's own chat template in the Gemma 4 format, written from the
format facts (not a copy of a released template). Use it wherever *a* Gemma 4 template is enough: rendering
e2e-mini prompts, tokenizer fixtures, loss-mask tests. Tests and code that are about the released templates
use :func:`harness.reference_data.load_reference_template` instead (reference data, read where it lives).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: File name of the project's own Gemma 4-format chat template inside this package.
GEMMA4_CHAT_TEMPLATE = "gemma4_chat_template.jinja"


def gemma4_chat_template_path() -> Path:
    """Filesystem path of the project's own Gemma 4-format chat template."""
    return Path(str(resources.files(__name__).joinpath(GEMMA4_CHAT_TEMPLATE)))


def load_gemma4_chat_template() -> str:
    """Text of the project's own Gemma 4-format chat template, checked like any template we load."""
    from gemma4.chat.templates import load_template

    return load_template(gemma4_chat_template_path())

"""Fixtures for the chat-mask tests: the project's own Gemma 4 template, the released templates (reference
data, gated by ``require_reference``) and tokenizers built from code."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gemma4.chat.templates import load_template
from gemma4.chat.tokenizer import load_tokenizer
from harness.assets import load_gemma4_chat_template
from harness.reference_data import REFERENCE_TEMPLATES
from harness.testing.chat import build_test_tokenizer

#: Key of the project's own template in the ``templates`` fixture.
OWN = "own"


class Templates(Mapping[str, str]):
    """``own`` (the project's template, always there) and the released templates by name, loaded on first
    access: a test that reads a released template is skipped, or failed under ``GEMMA4_REQUIRE_SHARED=1``,
    at that point when the reference data is missing."""

    def __init__(self, require: Callable[[str], Path]) -> None:
        self._require = require
        self._loaded: dict[str, str] = {OWN: load_gemma4_chat_template()}

    def __getitem__(self, name: str) -> str:
        if name not in self._loaded:
            if name not in REFERENCE_TEMPLATES:
                raise KeyError(name)
            self._loaded[name] = load_template(self._require(f"gemma4/{REFERENCE_TEMPLATES[name]}"))
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter((OWN, *REFERENCE_TEMPLATES))

    def __len__(self) -> int:
        return 1 + len(REFERENCE_TEMPLATES)


@pytest.fixture(scope="session")
def templates(require_reference: Callable[[str], Path]) -> Templates:
    """The project's own template (``own``) and the released ones (``standard``, ``interleaved_31b``)."""
    return Templates(require_reference)


@pytest.fixture(scope="session")
def released_templates(templates: Templates) -> dict[str, str]:
    """Both released templates; the test is skipped (failed in CI) when the reference data is missing."""
    return {name: templates[name] for name in REFERENCE_TEMPLATES}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The goldens' test tokenizer folder (no chat template inside)."""
    return build_test_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def merging_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tokenizer whose merges join a turn header's newline with the turn's first letter."""
    return load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("merging"), merge_across_turns=True))


@pytest.fixture(scope="session")
def tokenizer_dir_with_template(tmp_path_factory: pytest.TempPathFactory, templates: Templates) -> Path:
    """A tokenizer folder that carries the project's own template as chat_template.jinja."""
    return build_test_tokenizer(tmp_path_factory.mktemp("with-template"), chat_template=templates[OWN])


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], int]:
    """``harness.cli.main`` with only the ``mask`` subcommand registered, so these in-process tests do not
    depend on the import state of other subcommands (the subprocess test runs the full registry)."""
    import harness.cli

    monkeypatch.setattr(harness.cli, "COMMAND_MODULES", ("harness.commands.mask",))
    return harness.cli.main

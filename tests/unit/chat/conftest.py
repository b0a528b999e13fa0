"""Fixtures for the chat-mask tests: the real reference templates and tokenizers built from code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gemma4.chat.templates import REFERENCE_TEMPLATES, load_reference_template
from gemma4.chat.testing import build_test_tokenizer
from gemma4.chat.tokenizer import load_tokenizer
from gemma4.errors import InvalidInputError


@pytest.fixture(scope="session")
def templates() -> dict[str, str]:
    """Both reference templates by name; missing reference data fails the tests (never skips them)."""
    try:
        return {name: load_reference_template(name) for name in REFERENCE_TEMPLATES}
    except InvalidInputError as exc:
        pytest.fail(f"reference chat templates unavailable: {exc}", pytrace=False)


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
def tokenizer_dir_with_template(tmp_path_factory: pytest.TempPathFactory, templates: dict[str, str]) -> Path:
    """A tokenizer folder that carries the standard template as chat_template.jinja."""
    return build_test_tokenizer(tmp_path_factory.mktemp("with-template"), chat_template=templates["standard"])


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], int]:
    """``harness.cli.main`` with only the ``mask`` subcommand registered, so these in-process tests do not
    depend on the import state of other subcommands (the subprocess test runs the full registry)."""
    import harness.cli

    monkeypatch.setattr(harness.cli, "COMMAND_MODULES", ("gemma4.chat.cli",))
    return harness.cli.main

"""``gemma4-harness mask``: in process through ``harness.cli.main`` and once as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from gemma4.chat.mask import build_chat_mask
from harness.reference_data import REPO_ROOT
from harness.testing.chat_corpus import CASES

CASE = {case.name: case for case in CASES}


@pytest.fixture
def files(tmp_path: Path, templates: Mapping[str, str]) -> dict[str, Path]:
    """The case's messages and tools, and the project's own template, as files."""
    case = CASE["tool_responses_native"]
    paths = {
        "messages": tmp_path / "messages.json",
        "tools": tmp_path / "tools.json",
        "own": tmp_path / "own.jinja",
        "out": tmp_path / "out" / "mask.json",
    }
    paths["messages"].write_text(json.dumps(case.messages), encoding="utf-8")
    paths["tools"].write_text(json.dumps(case.tools), encoding="utf-8")
    paths["own"].write_text(templates["own"], encoding="utf-8")
    return paths


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


Main = Callable[[list[str]], int]


def mask_argv(tokenizer_dir: Path, messages: Path, out: Path, *extra: Any) -> list[str]:
    return [
        "mask",
        "--tokenizer",
        str(tokenizer_dir),
        "--messages",
        str(messages),
        "--json",
        str(out),
        *map(str, extra),
    ]


@pytest.mark.parametrize("template_name", ["own", "standard", "interleaved_31b"])
@pytest.mark.parametrize("thinking", [False, True])
def test_cli_writes_exactly_the_library_result(
    cli_main: Main,
    tmp_path: Path,
    tokenizer_dir: Path,
    tokenizer: Any,
    templates: Mapping[str, str],
    files: dict[str, Path],
    template_name: str,
    thinking: bool,
) -> None:
    template_file = tmp_path / f"{template_name}.jinja"
    template_file.write_text(templates[template_name], encoding="utf-8")
    extra = ["--tools", files["tools"], "--chat-template", template_file]
    argv = mask_argv(tokenizer_dir, files["messages"], files["out"], *extra)
    assert cli_main(argv + (["--enable-thinking"] if thinking else [])) == 0
    case = CASE["tool_responses_native"]
    expected = build_chat_mask(
        tokenizer, case.messages, case.tools, enable_thinking=thinking, chat_template=templates[template_name]
    )
    assert read(files["out"]) == {"input_ids": expected.input_ids, "loss_mask": expected.loss_mask}
    assert (tokenizer.convert_tokens_to_ids("<|think|>") in expected.input_ids) == thinking
    assert [p.name for p in files["out"].parent.iterdir()] == ["mask.json"]  # no temp file left behind


def test_cli_object_form_and_the_tokenizers_own_template(
    cli_main: Main,
    tmp_path: Path,
    tokenizer_dir_with_template: Path,
    tokenizer_dir: Path,
    files: dict[str, Path],
) -> None:
    case = CASE["tool_responses_native"]
    combined = tmp_path / "combined.json"
    combined.write_text(json.dumps({"messages": case.messages, "tools": case.tools}), encoding="utf-8")
    own, explicit = tmp_path / "own.json", tmp_path / "explicit.json"
    assert cli_main(mask_argv(tokenizer_dir_with_template, combined, own)) == 0
    extra = ["--tools", files["tools"], "--chat-template", files["own"]]
    assert cli_main(mask_argv(tokenizer_dir, files["messages"], explicit, *extra)) == 0
    assert read(own) == read(explicit)
    assert 1 in read(own)["loss_mask"]


def test_cli_replaces_an_existing_output(cli_main: Main, tokenizer_dir: Path, files: dict[str, Path]) -> None:
    files["out"].parent.mkdir(parents=True)
    files["out"].write_text("stale", encoding="utf-8")
    argv = mask_argv(tokenizer_dir, files["messages"], files["out"], "--chat-template", files["own"])
    assert cli_main(argv) == 0
    assert set(read(files["out"])) == {"input_ids", "loss_mask"}


def test_cli_as_a_subprocess(
    tokenizer_dir: Path, tokenizer: Any, templates: Mapping[str, str], files: dict[str, Path]
) -> None:
    argv = [
        sys.executable,
        "-m",
        "harness",
        "mask",
        "--tokenizer",
        str(tokenizer_dir),
        "--messages",
        str(files["messages"]),
    ]
    argv += [
        "--tools",
        str(files["tools"]),
        "--chat-template",
        str(files["own"]),
        "--json",
        str(files["out"]),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    case = CASE["tool_responses_native"]
    expected = build_chat_mask(tokenizer, case.messages, case.tools, chat_template=templates["own"])
    assert read(files["out"]) == {"input_ids": expected.input_ids, "loss_mask": expected.loss_mask}

    bad = files["messages"].with_name("bad.json")
    bad.write_text(json.dumps([{"role": "wizard", "content": "x"}]), encoding="utf-8")
    proc = subprocess.run(
        argv[:7] + [str(bad)] + argv[8:], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and f"{bad}[0].role: unknown role 'wizard'" in proc.stderr


def test_cli_module_imports_only_argparse() -> None:
    code = "import sys, harness.commands.mask; print(sorted(m for m in ('transformers', 'tokenizers', 'jinja2', 'torch') if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_outputs_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma4.atomic_io

    target = tmp_path / "out.json"
    target.write_text("previous", encoding="utf-8")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gemma4.atomic_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        gemma4.atomic_io.atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "previous"
    assert list(tmp_path.iterdir()) == [target]

"""Bad input: a clear error naming the file/field/role/token, and exit code 2 from the CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from gemma4.chat import tokens as T
from gemma4.chat.mask import RenderMismatchError, RenderMismatchWarning, build_chat_mask
from gemma4.chat.tokenizer import load_tokenizer
from gemma4.errors import InvalidInputError
from harness.testing.chat import build_test_tokenizer

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
HELLO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
CALL = {"function": {"name": "get_weather", "arguments": {"city": "X"}}}

BAD_MESSAGES = [
    pytest.param(
        [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}],
        r"\[1\]\.role: unknown role 'bot'",
        id="unknown-role",
    ),
    pytest.param([{"content": "hi"}], r"\[0\]: missing 'role'", id="missing-role"),
    pytest.param([{"role": "user"}], r"\[0\]: missing 'content' \(role 'user'", id="missing-content"),
    pytest.param([{"role": "user", "content": None}], r"\[0\]: missing 'content'", id="null-content"),
    pytest.param(
        [{"role": "assistant"}], r"\[0\]: missing 'content' \(role 'assistant'", id="assistant-no-content"
    ),
    pytest.param(
        [{"role": "user", "content": 3}], r"\[0\]\.content: must be a string or a list", id="content-type"
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "gif"}]}],
        r"\[0\]\.content\[0\]: expected an object",
        id="part-type",
    ),
    pytest.param(
        [{"role": "system", "content": [{"type": "text", "text": "x"}]}, *HELLO],
        r"\[0\]\.content: must be a string",
        id="system-parts",
    ),
    pytest.param(
        [{"role": "user", "content": "a", "tool_calls": [CALL]}],
        r"\[0\]\.tool_calls: only assistant",
        id="user-tool-call",
    ),
    pytest.param(
        [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": {}}]}],
        r"\[0\]\.tool_calls\[0\]: expected \{'function'",
        id="flat-tool-call",
    ),
    pytest.param(
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}],
        r"\[0\]\.tool_calls\[0\]\.function\.arguments: must be an object or a string",
        id="tool-call-arguments",
    ),
    pytest.param(
        [{"role": "assistant", "tool_calls": [CALL], "tool_responses": [{"name": "f"}]}],
        r"\[0\]\.tool_responses\[0\]: expected \{'name'",
        id="tool-response-shape",
    ),
    pytest.param(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<turn|>b"}],
        r"\[1\]\.content: contains the control string '<turn\|>'",
        id="turn-marker-in-content",
    ),
    pytest.param(
        [
            {
                "role": "assistant",
                "tool_calls": [CALL],
                "tool_responses": [{"name": "f", "response": "<tool_response|>"}],
            }
        ],
        r"\[0\]\.tool_responses\[0\]\.response: contains the control string",
        id="response-marker",
    ),
    pytest.param(
        [{"role": "assistant", "content": "x", "reasoning_content": 5}],
        r"\[0\]\.reasoning_content: must be a string",
        id="reasoning-type",
    ),
    pytest.param(
        {"role": "user", "content": "hi"}, r"expected a non-empty list of messages", id="not-a-list"
    ),
    pytest.param([], r"expected a non-empty list of messages", id="empty"),
]


@pytest.mark.parametrize(("messages", "pattern"), BAD_MESSAGES)
def test_bad_messages_are_rejected_naming_the_field(
    tokenizer: Any, templates: Mapping[str, str], messages: Any, pattern: str
) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        build_chat_mask(tokenizer, messages, chat_template=templates["own"], source="conv.json")


@pytest.mark.parametrize(
    ("tools", "pattern"),
    [
        pytest.param({"name": "f"}, r"tools: expected a list", id="not-a-list"),
        pytest.param(
            [{"name": "f", "parameters": {}}], r"tools\[0\]: expected \{'type': 'function'", id="flat"
        ),
        pytest.param(
            [{"function": {"name": "f", "description": "<|turn>x"}}],
            r"tools\[0\]\.function\.description: contains",
            id="marker",
        ),
    ],
)
def test_bad_tools_are_rejected(
    tokenizer: Any, templates: Mapping[str, str], tools: Any, pattern: str
) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        build_chat_mask(tokenizer, HELLO, tools, chat_template=templates["own"])


def test_template_without_gemma4_markers_is_rejected(tokenizer: Any) -> None:
    with pytest.raises(
        InvalidInputError, match=r"not a Gemma 4 chat template \(it never writes <\|turn> or <turn\|>\)"
    ):
        build_chat_mask(tokenizer, HELLO, chat_template=CHATML)


def test_tokenizer_without_a_chat_template_needs_one(tokenizer: Any) -> None:
    with pytest.raises(InvalidInputError, match="has no chat template.*--chat-template"):
        build_chat_mask(tokenizer, HELLO)


@pytest.mark.parametrize(
    ("omit", "pattern"),
    [
        pytest.param(
            (T.TURN_OPEN, T.TURN_CLOSE), r"'<\|turn>', '<turn\|>' are not a single token", id="turn-markers"
        ),
        pytest.param((T.BOS,), r"no bos_token is set", id="bos"),
    ],
)
def test_tokenizer_without_the_gemma4_special_tokens_is_rejected(
    tmp_path: Path, templates: Mapping[str, str], omit: tuple[str, ...], pattern: str
) -> None:
    tok = load_tokenizer(build_test_tokenizer(tmp_path, omit=omit))
    with pytest.raises(InvalidInputError, match=pattern):
        build_chat_mask(tok, HELLO, chat_template=templates["own"])


def test_other_control_strings_that_are_not_one_token_are_reported(
    tmp_path: Path, templates: Mapping[str, str]
) -> None:
    """Only <bos> and the turn markers are essential; another control string that is not one token still
    gets a correct mask, so it is reported (error on request) rather than refused."""
    tok = load_tokenizer(build_test_tokenizer(tmp_path, omit=(T.TOOL_CALL_OPEN,)))
    assert build_chat_mask(tok, HELLO, chat_template=templates["own"]).issues == ()  # not rendered: fine
    messages = [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "tool_calls": [CALL], "content": "ok"},
    ]
    pattern = r"'<\|tool_call>' \(written by the chat template at character \d+\) is not a single token"
    with pytest.warns(RenderMismatchWarning, match=pattern):
        result = build_chat_mask(tok, messages, chat_template=templates["own"])
    assert result.trained_text() == ['<|tool_call>call:get_weather{city:<|"|>X<|"|>}<tool_call|>ok<turn|>']
    with pytest.raises(RenderMismatchError, match=pattern):
        build_chat_mask(tok, messages, chat_template=templates["own"], on_mismatch="error")


def test_unknown_mismatch_policy(tokenizer: Any, templates: Mapping[str, str]) -> None:
    with pytest.raises(InvalidInputError, match="on_mismatch: 'loud'"):
        build_chat_mask(tokenizer, HELLO, chat_template=templates["own"], on_mismatch="loud")


# --- CLI: exit code 2 and a message naming the file -------------------------------------------------------


@pytest.fixture
def template_file(tmp_path: Path, templates: Mapping[str, str]) -> Path:
    path = tmp_path / "standard.jinja"
    path.write_text(templates["own"], encoding="utf-8")
    return path


Run = Callable[..., tuple[int, str]]


@pytest.fixture
def run_cli(cli_main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``mask`` with ``--tokenizer DIR --messages FILE [--chat-template FILE] --json OUT`` and extra flags."""

    def run(
        tokenizer: Path, messages: Path, template: Path | None, out: Path, *extra: Any
    ) -> tuple[int, str]:
        argv = ["mask", "--tokenizer", tokenizer, "--messages", messages, "--json", out, *extra]
        argv += ["--chat-template", template] if template is not None else []
        code = cli_main([str(arg) for arg in argv])
        return code, capsys.readouterr().err

    return run


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        pytest.param(
            [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "x"}],
            r"\[1\]\.role: unknown role",
            id="role",
        ),
        pytest.param([{"role": "user"}], r"\[0\]: missing 'content'", id="content"),
        pytest.param(
            {"messages": [{"role": "user"}]}, r": messages\[0\]: missing 'content'", id="object-form"
        ),
        pytest.param({"conversation": []}, r"an object with 'messages'", id="object-without-messages"),
        pytest.param('[{"role": "user",', r"conv.json: invalid JSON \(line 1", id="json"),
    ],
)
def test_cli_bad_messages_exit_2_naming_the_file(
    tmp_path: Path, tokenizer_dir: Path, template_file: Path, run_cli: Run, messages: Any, pattern: str
) -> None:
    msgs = write(tmp_path / "conv.json", messages)
    out = tmp_path / "out.json"
    code, err = run_cli(tokenizer_dir, msgs, template_file, out)
    assert code == 2
    assert err.startswith("gemma4-harness mask: error: ") and str(msgs) in err
    assert re.search(pattern, err), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["conv.json", "standard.jinja"]


def test_cli_template_without_markers_exit_2(tmp_path: Path, tokenizer_dir: Path, run_cli: Run) -> None:
    bad = write(tmp_path / "chatml.jinja", CHATML)
    code, err = run_cli(tokenizer_dir, write(tmp_path / "conv.json", HELLO), bad, tmp_path / "o.json")
    assert code == 2 and f"{bad}: not a Gemma 4 chat template" in err


def test_cli_tokenizer_problems_exit_2_naming_the_directory(
    tmp_path: Path, template_file: Path, run_cli: Run
) -> None:
    msgs = write(tmp_path / "conv.json", HELLO)
    plain = build_test_tokenizer(tmp_path / "plain-tokenizer", omit=(T.TURN_OPEN, T.TURN_CLOSE))
    empty = tmp_path / "empty"  # not tmp_path itself: the output may not lie inside an input directory
    empty.mkdir()
    for directory, pattern in [
        (plain, "are not a single token; the tokenizer must register the Gemma 4 special tokens"),
        (tmp_path / "nowhere", "tokenizer directory not found"),
        (empty, "no tokenizer.json"),
    ]:
        code, err = run_cli(directory, msgs, template_file, tmp_path / "o.json")
        assert code == 2 and str(directory) in err and pattern in err, err


def test_cli_missing_files_and_bad_tools_exit_2(
    tmp_path: Path, tokenizer_dir: Path, template_file: Path, run_cli: Run
) -> None:
    msgs = write(tmp_path / "conv.json", HELLO)
    out = tmp_path / "o.json"
    code, err = run_cli(tokenizer_dir, tmp_path / "none.json", template_file, out)
    assert code == 2 and "none.json: messages file not found" in err
    code, err = run_cli(tokenizer_dir, msgs, tmp_path / "none.jinja", out)
    assert code == 2 and "none.jinja: chat template file not found" in err
    tools = write(tmp_path / "tools.json", {"name": "f"})
    code, err = run_cli(tokenizer_dir, msgs, template_file, out, "--tools", tools)
    assert code == 2 and f"{tools}: expected a list of tool declarations" in err
    both = write(tmp_path / "both.json", {"messages": HELLO, "tools": []})
    code, err = run_cli(tokenizer_dir, both, template_file, out, "--tools", write(tmp_path / "t.json", []))
    assert code == 2 and "has 'tools' and --tools was given too" in err
    code, err = run_cli(tokenizer_dir, msgs, None, out)
    assert code == 2 and "has no chat template" in err
    assert not out.exists()


def test_cli_on_mismatch_error_exit_2(
    tmp_path: Path, tokenizer_dir: Path, template_file: Path, run_cli: Run
) -> None:
    thinking = {"role": "assistant", "content": "<|channel>thought\nx<channel|>y"}
    msgs = write(tmp_path / "conv.json", [HELLO[0], thinking])
    code, err = run_cli(tokenizer_dir, msgs, template_file, tmp_path / "o.json", "--on-mismatch", "error")
    assert code == 2 and f"{msgs}[1].content: the template strips the thinking" in err
    code, err = run_cli(tokenizer_dir, msgs, template_file, tmp_path / "o.json")
    assert code == 0 and f"gemma4-harness mask: warning: {msgs}[1].content" in err

"""Hand-written conversations with the exact trained text spelled out, one policy rule per test."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import pytest

from gemma4.chat.mask import ChatMask, RenderMismatchError, RenderMismatchWarning, build_chat_mask
from harness.testing.chat_corpus import CASES, WEATHER_TOOL

# The project's own template and both released ones (those skip, or fail in CI, without the reference data).
EVERY_TEMPLATE = pytest.mark.parametrize("template_name", ["own", "standard", "interleaved_31b"])
CASE = {case.name: case for case in CASES}


def mask_of(tokenizer: Any, template: str, messages: list, tools: Any = None, **kwargs: Any) -> ChatMask:
    kwargs.setdefault("on_mismatch", "ignore")
    return build_chat_mask(tokenizer, messages, tools, chat_template=template, **kwargs)


def token_flags(tokenizer: Any, result: ChatMask) -> list[tuple[str, int]]:
    return list(zip(tokenizer.convert_ids_to_tokens(result.input_ids), result.loss_mask))


@EVERY_TEMPLATE
def test_single_turn_trains_from_after_the_header_through_turn_close(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    result = mask_of(tokenizer, templates[template_name], CASE["single_turn"].messages)
    assert result.trained_text() == ["Hi! How can I help?<turn|>"]
    flags = token_flags(tokenizer, result)
    assert flags[0] == ("<bos>", 0)
    model = next(k for k, (tok, _) in enumerate(flags) if tok == "model")
    assert flags[model - 1 : model + 3] == [("<|turn>", 0), ("model", 0), ("\n", 0), ("H", 1)]
    assert flags[-2:] == [("<turn|>", 1), ("\n", 0)]
    assert sum(result.loss_mask) == len(
        tokenizer.encode("Hi! How can I help?<turn|>", add_special_tokens=False)
    )


@EVERY_TEMPLATE
def test_system_user_and_every_header_are_not_trained(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    result = mask_of(tokenizer, templates[template_name], CASE["system_multi_turn"].messages)
    assert result.trained_text() == ["4<turn|>", "6<turn|>"]
    assert result.text.startswith("<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\n2+2?<turn|>\n")


@EVERY_TEMPLATE
def test_model_tool_calls_are_trained_and_tool_responses_are_not(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    case = CASE["tool_responses_native"]
    result = mask_of(tokenizer, templates[template_name], case.messages, case.tools)
    assert result.trained_text() == [
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>',
        "It is -3 C and snowing in Oslo.<turn|>",
    ]
    assert '<|tool_response>response:get_weather{sky:<|"|>snow<|"|>,temp:-3}<tool_response|>' in result.text
    flags = token_flags(tokenizer, result)
    assert all(flag == 0 for tok, flag in flags if tok in ("<|tool_response>", "<tool_response|>", "<|tool>"))


@EVERY_TEMPLATE
def test_openai_style_tool_turn_is_not_trained(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    case = CASE["tools_openai_style"]
    result = mask_of(tokenizer, templates[template_name], case.messages, case.tools)
    assert result.trained_text() == [
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}<tool_call|><turn|>',
        "It is 21 C in Paris.<turn|>",
    ]
    assert '<|turn>tool\n{"temp": 21}<turn|>' in result.text


def test_interleaved_template_trains_the_reasoning_it_renders(
    tokenizer: Any, templates: Mapping[str, str]
) -> None:
    case = CASE["agentic_reasoning_after_last_user"]
    result = mask_of(tokenizer, templates["interleaved_31b"], case.messages, case.tools, enable_thinking=True)
    assert result.trained_text() == [
        '<|channel>thought\nFirst the weather.<channel|><|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>',
        '<|channel>thought\nNow the news.<channel|><|tool_call>call:search{filters:{site:<|"|>x.it<|"|>},'
        'query:<|"|>Rome news<|"|>,tags:[<|"|>today<|"|>]}<tool_call|>',
        "25 C, and no news.<turn|>",
    ]
    assert result.issues == ()


@pytest.mark.parametrize("template_name", ["own", "standard"])
def test_standard_template_drops_reasoning_and_reports_it(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    case = CASE["agentic_reasoning_after_last_user"]
    result = mask_of(tokenizer, templates[template_name], case.messages, case.tools, enable_thinking=True)
    assert not any("thought" in run for run in result.trained_text())
    assert [(i.message_index, i.field) for i in result.issues] == [
        (2, "reasoning_content"),
        (3, "reasoning_content"),
    ]


@EVERY_TEMPLATE
def test_reasoning_before_the_last_user_turn_is_dropped_and_reported(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    case = CASE["agentic_reasoning_before_last_user"]
    result = mask_of(tokenizer, templates[template_name], case.messages, case.tools, enable_thinking=True)
    assert "Call the tool." not in result.text
    assert [(i.message_index, i.field) for i in result.issues] == [(1, "reasoning_content")]


@EVERY_TEMPLATE
def test_stripped_thinking_is_not_trained_and_the_mismatch_is_visible(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    case = CASE["thinking_in_content_stripped"]
    template = templates[template_name]
    with pytest.warns(
        RenderMismatchWarning, match=r"messages\[\d\]\.content: the template strips the thinking"
    ) as caught:
        result = build_chat_mask(tokenizer, case.messages, chat_template=template, enable_thinking=True)
    assert [str(w.message).split(":")[0] for w in caught] == ["messages[1].content", "messages[3].content"]
    assert result.trained_text() == ["Yes.<turn|>", "No, 9 = 3 x 3.<turn|>"]
    assert "divisors" not in result.text
    flags = token_flags(tokenizer, result)
    assert ("<|think|>", 0) in flags

    with pytest.raises(RenderMismatchError, match=r"messages\[3\]\.content"):
        build_chat_mask(tokenizer, case.messages, chat_template=template, on_mismatch="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = build_chat_mask(tokenizer, case.messages, chat_template=template, on_mismatch="ignore")
    assert [(i.message_index, i.field) for i in quiet.issues] == [(1, "content"), (3, "content")]


@EVERY_TEMPLATE
def test_whitespace_and_empty_model_turns(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    result = mask_of(tokenizer, templates[template_name], CASE["empty_and_whitespace"].messages)
    # An empty answer still trains the stop token; the trimmed whitespace is reported, not trained.
    assert result.trained_text() == ["<turn|>", "yes<turn|>"]
    assert [(i.message_index, i.field) for i in result.issues] == [(3, "content")]
    assert "trims leading/trailing whitespace" in result.issues[0].detail


@EVERY_TEMPLATE
def test_multibyte_characters_split_into_byte_tokens_keep_their_mask(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    result = mask_of(tokenizer, templates[template_name], CASE["unicode"].messages)
    assert result.trained_text() == ["bigger, Tokyo, café ☕ — 👍<turn|>"]
    byte_tokens = [flag for tok, flag in token_flags(tokenizer, result) if tok.startswith("<0x")]
    assert 1 in byte_tokens and 0 in byte_tokens  # user and model turns both have byte-fallback tokens


def test_model_message_written_without_a_header_is_still_trained(
    tokenizer: Any, templates: Mapping[str, str]
) -> None:
    """Interleaved template: after tool responses the next tool-calling message gets no header, even when
    the previous message closed its turn, and even after a tool-role message."""
    call = {"function": {"name": "get_weather", "arguments": {"city": "X"}}}
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "tool_calls": [call],
            "tool_responses": [{"name": "w", "response": 1}],
            "content": "a",
        },
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_responses": [{"name": "w", "response": 2}]},
        {"role": "assistant", "tool_calls": [call], "content": "b"},
    ]
    result = mask_of(tokenizer, templates["interleaved_31b"], messages)
    call_text = '<|tool_call>call:get_weather{city:<|"|>X<|"|>}<tool_call|>'
    assert f"a<turn|>\n{call_text}<turn|>\n<|turn>tool\n<|tool_response>" in result.text
    assert result.trained_text() == [call_text, "a<turn|>", f"{call_text}<turn|>", f"{call_text}b<turn|>"]


def test_a_token_merging_across_the_header_is_trained_and_reported(
    merging_tokenizer: Any, templates: Mapping[str, str]
) -> None:
    messages = CASE["single_turn"].messages
    with pytest.warns(RenderMismatchWarning, match=r"'\\nH'.*mixes trained and untrained"):
        result = build_chat_mask(merging_tokenizer, messages, chat_template=templates["own"])
    flags = token_flags(merging_tokenizer, result)
    assert ("\nH", 1) in flags and ("model", 0) in flags
    with pytest.raises(RenderMismatchError, match="mixes trained and untrained"):
        build_chat_mask(merging_tokenizer, messages, chat_template=templates["own"], on_mismatch="error")


def test_tokenizer_template_is_used_by_default(
    tokenizer_dir_with_template: Any, templates: Mapping[str, str]
) -> None:
    from gemma4.chat.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir_with_template)
    messages = CASE["system_multi_turn"].messages
    implicit = build_chat_mask(tok, messages)
    explicit = build_chat_mask(tok, messages, chat_template=templates["own"])
    assert (implicit.input_ids, implicit.loss_mask) == (explicit.input_ids, explicit.loss_mask)
    # An explicit template wins over the tokenizer's own: one that writes a longer system turn.
    longer = templates["own"].replace(
        "messages[0]['content'] | trim", "'Be brief. ' + messages[0]['content'] | trim"
    )
    assert longer != templates["own"]
    other = build_chat_mask(tok, messages, chat_template=longer)
    assert other.input_ids != implicit.input_ids and "Be brief. You are terse." in other.text


@EVERY_TEMPLATE
def test_bos_is_written_once_by_the_template(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    # The test tokenizer's post-processor would prepend a second <bos> if special tokens were added.
    result = mask_of(tokenizer, templates[template_name], CASE["single_turn"].messages, tools=[WEATHER_TOOL])
    assert result.input_ids[0] == tokenizer.bos_token_id
    assert result.input_ids.count(tokenizer.bos_token_id) == 1

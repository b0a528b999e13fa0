"""Property tests: random conversations under our own and both released templates, checked against
transformers and against an independent, render-level reading of the policy."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4.chat.mask import build_chat_mask
from harness.testing.chat_corpus import SEARCH_TOOL, WEATHER_TOOL

# The project's own template, and both released ones (skipped, or failed in CI, without the reference data).
TEMPLATE_NAMES = ("own", "standard", "interleaved_31b")
# Renders are cheap (about 10 ms an example), so run more examples than the CI profile's default, and
# follow a profile that asks for even more ("thorough").
EXAMPLES = max(120, settings().max_examples)
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# Letters, digits, whitespace, JSON-ish punctuation, multi-byte characters and a Gemma string quote.
_ALPHABET = st.sampled_from(list("abcXYZ019 \n\t.,:{}[]\"'-_é中🙂") + ['<|"|>', "model", "<eos>"])
text = st.lists(_ALPHABET, max_size=8).map("".join) | st.sampled_from(
    ["", " ", "\n", "  \n ", "hello the model"]
)
thinking = st.builds(
    lambda pre, thought, post: f"{pre}<|channel>thought\n{thought}<channel|>{post}", text, text, text
)
model_text = text | thinking
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 99) | text,
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(["a", "b", "city"]), inner, max_size=2)
    ),
    max_leaves=4,
)
tool_call = st.builds(
    lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}},
    st.sampled_from(["get_weather", "search"]),
    st.dictionaries(st.sampled_from(["city", "query", "n"]), json_value, max_size=2) | st.just('{"raw": 1}'),
)
tool_response = st.builds(
    lambda name, response: {"name": name, "response": response},
    st.sampled_from(["get_weather", "search"]),
    json_value,
)


@st.composite
def assistant_message(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": draw(st.sampled_from(["assistant", "assistant", "model"]))}
    if draw(st.booleans()):
        message["tool_calls"] = draw(st.lists(tool_call, min_size=1, max_size=2))
        if draw(st.booleans()):
            message["tool_responses"] = draw(st.lists(tool_response, min_size=1, max_size=2))
    if draw(st.booleans()):
        message[draw(st.sampled_from(["reasoning_content", "reasoning_content", "thinking"]))] = draw(text)
    if "tool_calls" not in message or draw(st.booleans()):
        message["content"] = draw(model_text | st.lists(model_text, max_size=2).map(_parts))
    return message


def _parts(texts: list[str]) -> list[dict[str, str]]:
    return [{"type": "text", "text": t} for t in texts]


user_message = st.builds(
    lambda content: {"role": "user", "content": content}, text | st.lists(text, max_size=2).map(_parts)
)


@st.composite
def tool_message(draw: st.DrawFn) -> dict[str, Any]:
    """OpenAI-style (role tool, text content) or Gemma-style (``tool_responses``, content optional)."""
    message: dict[str, Any] = {"role": "tool"}
    if draw(st.booleans()):
        message["tool_responses"] = draw(st.lists(tool_response, min_size=1, max_size=2))
    if "tool_responses" not in message or draw(st.booleans()):
        message["content"] = draw(text)
    return message


later_system = st.builds(lambda content: {"role": "system", "content": content}, text)


@st.composite
def conversation(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(text)})
    body = draw(
        st.lists(
            st.one_of(user_message, assistant_message(), assistant_message(), tool_message(), later_system),
            min_size=1,
            max_size=6,
        )
    )
    messages.extend(body)
    tools = draw(st.sampled_from([None, [WEATHER_TOOL], [WEATHER_TOOL, SEARCH_TOOL]]))
    return messages, tools, draw(st.booleans())


def oracle_trainable_chars(rendered: str) -> list[int]:
    """The policy read off the render alone. A model span starts after ``<|turn>model\\n``, or at a reasoning
    channel or tool call written outside a model span (the interleaved template continues without a header
    after tool responses); it runs through the next ``<turn|>``, or up to the next header / the end when left
    open. Tool responses inside are not trained."""
    mask = [0] * len(rendered)
    starts = re.finditer(r"<\|turn>model\n|<\|channel>|<\|tool_call>", rendered)
    covered_to = 0
    for match in starts:
        if match.start() < covered_to:
            continue
        start = match.end() if match.group().startswith("<|turn>") else match.start()
        close = rendered.find("<turn|>", start)
        following = rendered.find("<|turn>", start)
        if close >= 0 and (following < 0 or close < following):
            end = close + len("<turn|>")
        else:
            end = following if following >= 0 else len(rendered)
        mask[start:end] = [1] * (end - start)
        covered_to = end
    for response in re.finditer(r"<\|tool_response>.*?<tool_response\|>", rendered, flags=re.S):
        mask[response.start() : response.end()] = [0] * (response.end() - response.start())
    return mask


def strip_thinking(content: str) -> str:
    """Python reading of the templates' ``strip_thinking`` macro."""
    parts = content.split("<channel|>")
    return "".join(part.split("<|channel>")[0] if "<|channel>" in part else part for part in parts).strip()


def _render(tokenizer: Any, template: str, messages: list, tools: Any, thinking: bool, tokenize: bool) -> Any:
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=tokenize, enable_thinking=thinking
    )


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
@SETTINGS
@given(conv=conversation())
def test_mask_selects_exactly_the_model_turns_trainable_characters(
    tokenizer: Any, templates: Mapping[str, str], template_name: str, conv: tuple
) -> None:
    messages, tools, enable_thinking = conv
    template = templates[template_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = build_chat_mask(
            tokenizer, messages, tools, enable_thinking=enable_thinking, chat_template=template
        )

    # transformers is the oracle for the render and the ids.
    assert result.text == _render(tokenizer, template, messages, tools, enable_thinking, tokenize=False)
    assert (
        result.input_ids == _render(tokenizer, template, messages, tools, enable_thinking, True)["input_ids"]
    )
    assert len(result.loss_mask) == len(result.input_ids)
    assert result.input_ids.count(tokenizer.bos_token_id) == 1

    # Every character belongs to exactly one token here, and no token mixes trained and untrained characters,
    # so the trained characters must be exactly the oracle's.
    expected = oracle_trainable_chars(result.text)
    trained = [0] * len(result.text)
    for flag, (start, end) in zip(result.loss_mask, result.offsets):
        assert len(set(expected[start:end])) <= 1, (result.text[start:end], result.text)
        if flag:
            trained[start:end] = [1] * (end - start)
    assert trained == expected, result.text
    spans = [0] * len(result.text)
    for start, end in result.trainable_char_spans():
        spans[start:end] = [1] * (end - start)
    assert spans == expected

    # The segments tile the render, so nothing is attributed twice or skipped.
    assert [s.start for s in result.segments[1:]] == [s.end for s in result.segments[:-1]]
    assert result.segments[0].start == 0 and result.segments[-1].end == len(result.text)

    # Whatever the template drops from a model message is reported.
    flagged = {(issue.message_index, issue.field) for issue in result.issues}
    for index, message in enumerate(messages):
        if message["role"] not in ("assistant", "model"):
            continue
        content = message.get("content")
        if isinstance(content, str) and strip_thinking(content) != content:
            assert (index, "content") in flagged, (index, content)
        for field in ("reasoning_content", "thinking"):
            reasoning = message.get(field)
            if reasoning and f"<|channel>thought\n{reasoning}<channel|>" not in result.text:
                assert (index, field) in flagged


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
@settings(SETTINGS, max_examples=EXAMPLES // 2)
@given(conv=conversation())
def test_tokens_merging_across_turn_boundaries_are_trained_and_reported(
    merging_tokenizer: Any, templates: Mapping[str, str], template_name: str, conv: tuple
) -> None:
    messages, tools, enable_thinking = conv
    template = templates[template_name]
    result = build_chat_mask(
        merging_tokenizer,
        messages,
        tools,
        enable_thinking=enable_thinking,
        chat_template=template,
        on_mismatch="ignore",
    )
    assert (
        result.input_ids
        == _render(merging_tokenizer, template, messages, tools, enable_thinking, True)["input_ids"]
    )
    expected = oracle_trainable_chars(result.text)
    straddling = set()
    for k, (flag, (start, end)) in enumerate(zip(result.loss_mask, result.offsets)):
        chars = set(expected[start:end])
        assert flag == (1 if 1 in chars else 0), (result.text[start:end], result.text)
        if chars == {0, 1}:
            straddling.add(f"input_ids[{k}]")
    assert straddling == {issue.field for issue in result.issues if issue.message_index is None}

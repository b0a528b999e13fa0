"""The slime-shaped generator and the token-in/token-out rollout mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from gemma4.chat.mask import build_chat_mask
from gemma4.errors import InvalidInputError
from gemma4.slime.loss_mask import Gemma4LossMaskGenerator, rollout_loss_mask
from harness.testing.chat_corpus import CASES

CASE = {case.name: case for case in CASES}


@pytest.mark.parametrize("template_name", ["own", "interleaved_31b"])
def test_generator_has_slimes_interface_and_matches_the_mask(
    tokenizer: Any, templates: Mapping[str, str], template_name: str
) -> None:
    case = CASE["tools_openai_style"]
    generator = Gemma4LossMaskGenerator(
        tokenizer, tokenizer_type="gemma4", chat_template=templates[template_name]
    )
    token_ids, loss_mask = generator.get_loss_mask(case.messages, tools=case.tools)
    expected = build_chat_mask(tokenizer, case.messages, case.tools, chat_template=templates[template_name])
    assert (token_ids, loss_mask) == (expected.input_ids, expected.loss_mask)
    assert generator.get_text_from_loss_mask(token_ids, loss_mask) == [
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}<tool_call|><turn|>',
        "It is 21 C in Paris.<turn|>",
    ]
    [length] = generator.get_response_lengths([loss_mask])
    assert length == len(loss_mask) - loss_mask.index(1)
    assert loss_mask[-length - 1] == 0 and loss_mask[-length] == 1


def test_generator_passes_enable_thinking_and_the_tokenizers_template(
    tokenizer_dir_with_template: Any, templates: Mapping[str, str]
) -> None:
    from gemma4.chat.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir_with_template)
    messages = CASE["single_turn"].messages
    ids, _ = Gemma4LossMaskGenerator(tok, enable_thinking=True).get_loss_mask(messages)
    assert (
        ids == build_chat_mask(tok, messages, enable_thinking=True, chat_template=templates["own"]).input_ids
    )
    assert tok.convert_tokens_to_ids("<|think|>") in ids


def test_response_lengths_follow_slime() -> None:
    generator = Gemma4LossMaskGenerator(object())
    assert generator.get_response_lengths([[0, 0, 1, 0, 1], [0, 0], [1], []]) == [3, 0, 1, 0]


def test_only_the_gemma4_tokenizer_type() -> None:
    with pytest.raises(InvalidInputError, match="tokenizer_type: 'qwen'"):
        Gemma4LossMaskGenerator(object(), tokenizer_type="qwen")


def test_text_from_loss_mask_checks_lengths(tokenizer: Any) -> None:
    with pytest.raises(InvalidInputError, match="length 1 != token_ids length 2"):
        Gemma4LossMaskGenerator(tokenizer).get_text_from_loss_mask([5, 6], [1])


def test_rollout_mask_is_one_exactly_on_model_spans() -> None:
    result = rollout_loss_mask(
        [2, 105, 7], [("model", [8, 9]), ("tool", [50, 51]), ("env", []), ("model", [10])]
    )
    assert result.token_ids == [2, 105, 7, 8, 9, 50, 51, 10]
    assert result.loss_mask == [0, 0, 0, 1, 1, 0, 0, 1]
    assert result.prompt_length == 3 and result.response_length == 5
    assert result.response_loss_mask == [1, 1, 0, 0, 1]


def test_rollout_mask_keeps_tokens_as_given(tokenizer: Any) -> None:
    """Token-in/token-out: a model span is never re-tokenized, even when re-tokenizing would merge it."""
    prompt = tokenizer.encode("<bos><|turn>user\nhi<turn|>\n<|turn>model\n", add_special_tokens=False)
    sampled = [tokenizer.convert_tokens_to_ids(t) for t in ["m", "o", "d", "e", "l", "<turn|>"]]  # not merged
    result = rollout_loss_mask(prompt, [("model", sampled)])
    assert result.token_ids[len(prompt) :] == sampled
    assert tokenizer.encode("model<turn|>", add_special_tokens=False) != sampled


@pytest.mark.parametrize(
    ("prompt", "spans", "pattern"),
    [
        pytest.param([1], [("assistant", [2])], r"spans\[0\]: unknown kind 'assistant'", id="kind"),
        pytest.param([1], [("model", [2, -1])], r"spans\[0\]\[1\]\[1\]: -1 is not a token id", id="negative"),
        pytest.param([1], [("model", "ab")], r"spans\[0\]\[1\]: expected a list of token ids", id="string"),
        pytest.param([1.5], [], r"prompt_ids\[0\]: 1.5 is not a token id", id="float"),
        pytest.param([True], [], r"prompt_ids\[0\]: True is not a token id", id="bool"),
        pytest.param([1], [("model",)], r"spans\[0\]: expected a \(kind, token_ids\) pair", id="pair"),
        pytest.param([1], [("model", [600])], r"token id 600 >= vocab size 600", id="vocab"),
    ],
)
def test_rollout_mask_rejects_bad_input(prompt: Any, spans: Any, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        rollout_loss_mask(prompt, spans, vocab_size=600)

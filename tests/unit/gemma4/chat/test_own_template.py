"""The project's own Gemma 4-format template (``harness/assets``): a Gemma 4 template the mask code accepts,
and, where the format fixes the text, the same render as the released standard template."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from gemma4.chat.templates import check_gemma4_template
from harness.assets import gemma4_chat_template_path, load_gemma4_chat_template
from harness.testing.chat_corpus import CASES

# Where the two templates differ on purpose: media placeholders (ours writes them bare), tool declarations
# (ours writes parameters as one structured value), and the generation prompt after a message that has tool
# responses *and* content (its turn is closed, so ours opens a model turn; the released one does not).
SAME_RENDER = [case for case in CASES if case.name != "content_parts"]


def _closed_after_tool_responses(case: Any) -> bool:
    last = case.messages[-1]
    return bool(last.get("tool_responses")) and bool(last.get("content"))


def test_own_template_ships_with_the_package_and_is_a_gemma4_template() -> None:
    assert gemma4_chat_template_path().is_file()
    check_gemma4_template(load_gemma4_chat_template(), "own template")


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("case", SAME_RENDER, ids=lambda case: case.name)
def test_own_template_renders_like_the_released_standard_one(
    tokenizer: Any, templates: Mapping[str, str], case: Any, thinking: bool, generation_prompt: bool
) -> None:
    def render(template: str) -> str:
        return tokenizer.apply_chat_template(
            case.messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            enable_thinking=thinking,
        )

    if generation_prompt and _closed_after_tool_responses(case):
        assert render(templates["own"]).endswith(
            "<turn|>\n<|turn>model\n" + ("" if thinking else "<|channel>thought\n<channel|>")
        )
        return
    assert render(templates["own"]) == render(templates["standard"])

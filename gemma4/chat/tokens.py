"""The control strings the Gemma 4 chat templates emit (see ``shared/reference/gemma4/README.md``)."""

from __future__ import annotations

BOS = "<bos>"
TURN_OPEN = "<|turn>"
TURN_CLOSE = "<turn|>"
THINK = "<|think|>"
CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
TOOL_OPEN = "<|tool>"
TOOL_CLOSE = "<tool|>"
TOOL_CALL_OPEN = "<|tool_call>"
TOOL_CALL_CLOSE = "<tool_call|>"
TOOL_RESPONSE_OPEN = "<|tool_response>"
TOOL_RESPONSE_CLOSE = "<tool_response|>"
STRING_QUOTE = '<|"|>'
IMAGE = "<|image|>"
AUDIO = "<|audio|>"
VIDEO = "<|video|>"

#: Every control string a Gemma 4 template may write; each must be one token of the tokenizer
#: wherever it occurs in a render.
CONTROL_STRINGS: tuple[str, ...] = (
    TURN_OPEN,
    TURN_CLOSE,
    THINK,
    CHANNEL_OPEN,
    CHANNEL_CLOSE,
    TOOL_OPEN,
    TOOL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_RESPONSE_OPEN,
    TOOL_RESPONSE_CLOSE,
    STRING_QUOTE,
    IMAGE,
    AUDIO,
    VIDEO,
)

#: Strings that delimit turns and tool responses. They may not appear inside message or tool text:
#: the tokenizer would encode them as control tokens and the turn layout would become ambiguous.
STRUCTURAL_STRINGS: tuple[str, ...] = (TURN_OPEN, TURN_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)

#: The header of a model turn; the trainable span of a turn starts right after it.
MODEL_ROLE = "model"
THOUGHT_PREFIX = CHANNEL_OPEN + "thought\n"

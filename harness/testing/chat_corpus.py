"""The fixed conversations recorded as goldens (each under both reference templates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    """One conversation: messages, optional tools, ``enable_thinking``."""

    name: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    enable_thinking: bool = False
    note: str = field(default="", compare=False)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "Forecast days", "nullable": True},
            },
            "required": ["city"],
        },
    },
}

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {"site": {"type": "string"}},
                    "required": ["site"],
                },
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["query"],
        },
    },
}


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CASES: tuple[Case, ...] = (
    Case(
        "single_turn",
        [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}],
    ),
    Case(
        "system_multi_turn",
        [
            {"role": "system", "content": "  You are terse.  "},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
    ),
    Case(
        "developer_first",
        [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
        ],
    ),
    Case(
        "thinking_in_content_stripped",
        [
            {"role": "user", "content": "Is 7 prime?"},
            {
                "role": "assistant",
                "content": "<|channel>thought\n7 has no divisors but 1 and 7.<channel|>Yes.",
            },
            {"role": "user", "content": "And 9?"},
            {"role": "assistant", "content": "<|channel>thought\n9 = 3 * 3<channel|>No, 9 = 3 x 3."},
        ],
        enable_thinking=True,
        note="both templates strip thinking from every model turn: it is neither rendered nor trained",
    ),
    Case(
        "tools_openai_style",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [_call("get_weather", {"city": "Paris", "unit": "celsius"})]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 C in Paris."},
        ],
        tools=[WEATHER_TOOL],
    ),
    Case(
        "tool_responses_native",
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "tool_calls": [_call("get_weather", {"city": "Oslo"})],
                "tool_responses": [{"name": "get_weather", "response": {"temp": -3, "sky": "snow"}}],
                "content": "It is -3 C and snowing in Oslo.",
            },
        ],
        tools=[WEATHER_TOOL],
    ),
    Case(
        "agentic_reasoning_after_last_user",
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Find the weather and news for Rome."},
            {
                "role": "assistant",
                "reasoning_content": "First the weather.",
                "tool_calls": [_call("get_weather", {"city": "Rome"})],
                "tool_responses": [{"name": "get_weather", "response": {"temp": 25}}],
            },
            {
                "role": "assistant",
                "reasoning_content": "Now the news.",
                "tool_calls": [
                    _call("search", {"query": "Rome news", "tags": ["today"], "filters": {"site": "x.it"}})
                ],
                "tool_responses": [{"name": "search", "response": "Nothing new."}],
            },
            {"role": "assistant", "content": "25 C, and no news."},
        ],
        tools=[WEATHER_TOOL, SEARCH_TOOL],
        enable_thinking=True,
        note="the interleaved template renders (and trains) the reasoning; the standard one drops it",
    ),
    Case(
        "agentic_reasoning_before_last_user",
        [
            {"role": "user", "content": "Weather in Rome?"},
            {
                "role": "assistant",
                "reasoning_content": "Call the tool.",
                "tool_calls": [_call("get_weather", {"city": "Rome"})],
                "tool_responses": [{"name": "get_weather", "response": {"temp": 25}}],
                "content": "25 C.",
            },
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ],
        tools=[WEATHER_TOOL],
        enable_thinking=True,
        note="reasoning before the last user turn is dropped by both templates",
    ),
    Case(
        "empty_and_whitespace",
        [
            {"role": "user", "content": " "},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "\n\tstill there?\n"},
            {"role": "assistant", "content": "  \n yes \n"},
        ],
    ),
    Case(
        "unicode",
        [
            {"role": "user", "content": "Translate: größer, 東京, café"},
            {"role": "assistant", "content": "bigger, Tokyo, café ☕ — 👍"},
        ],
    ),
    Case(
        "content_parts",
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "A cat."}, {"type": "text", "text": " Cute."}],
            },
        ],
    ),
    Case(
        "parallel_tool_calls_string_arguments",
        [
            {"role": "user", "content": "Weather in A and B?"},
            {
                "role": "assistant",
                "tool_calls": [
                    _call("get_weather", {"city": "A", "days": 2}),
                    _call("get_weather", '{"city": "B"}'),
                ],
                "tool_responses": [
                    {"name": "get_weather", "response": {"temp": 1, "ok": True}},
                    {"name": "get_weather", "response": [1, 2]},
                ],
            },
            {"role": "assistant", "content": "A: 1, B: 2."},
        ],
        tools=[WEATHER_TOOL],
    ),
    Case(
        "thinking_flag_no_system",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        enable_thinking=True,
    ),
)

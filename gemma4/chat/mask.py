"""Loss masks for Gemma 4 conversations, computed on the checkpoint's own chat template.

How it works: the conversation is rendered with the chat template exactly as transformers'
``apply_chat_template(..., tokenize=False)`` renders it; the render is then walked message by message and cut
into segments (``<bos>``, turn headers, reasoning, tool calls, tool responses, content, ``<turn|>``, the
newline after it). Trainable characters are the segments listed below; the render is tokenized once, with
offsets, and a token is trainable when any of its characters is. The ids returned are checked against
``apply_chat_template(..., tokenize=True)``; ``<bos>``, ``<|turn>`` and ``<turn|>`` must each be exactly one
token wherever the render has them (any other control string that is not one token is reported).

Policy (the default, and the only one):

* Trainable: in each model turn (``assistant`` or ``model`` messages), everything from the first character
  after ``<|turn>model\\n`` through the turn's closing ``<turn|>``: reasoning the template renders, tool calls
  (``<|tool_call>…<tool_call|>``), content, and ``<turn|>`` itself.
* Not trainable: ``<bos>``, the system turn (system prompt, ``<|think|>``, tool declarations), user, developer
  and tool turns, every turn header, the newline after ``<turn|>``, and tool responses
  (``<|tool_response>…<tool_response|>``) even inside a model turn.
* Attribution is by message: what an ``assistant``/``model`` message renders is trained wherever the template
  puts it. After a message with tool responses the 31B interleaved template writes the next tool-calling
  message without a header (continuing the open turn, or even after a closed one, exactly where its generation
  prompt lets the model generate); that message's reasoning, tool calls, content and ``<turn|>`` are trained.

Thinking: the mask trains exactly what the template renders, nothing else.

* Standard template (``chat_template.jinja``): every model turn's content has its ``<|channel>…<channel|>``
  span stripped (the last turn too), and ``reasoning_content`` is never rendered, so thinking is never
  trained; ``enable_thinking`` only writes ``<|think|>`` into the (untrained) system turn.
* 31B interleaved template: additionally renders ``reasoning_content`` as ``<|channel>thought\\n…<channel|>``
  before the tool calls of model messages that have tool calls and come after the last user message; that
  reasoning is inside the model turn and is trained. Reasoning anywhere else is dropped and not trained.

Whatever the template drops from a model message (thinking in ``content``, an unrendered
``reasoning_content``/``thinking``/``reasoning`` field, whitespace trimmed from the ends of ``content``) is a
mismatch between what the model produced and what is trained; it is reported as a
:class:`RenderMismatchWarning` (``on_mismatch="warn"``, default), raised as :class:`RenderMismatchError`
(``"error"``) or only recorded in :attr:`ChatMask.issues` (``"ignore"``). A token that mixes trainable and
untrained characters (a tokenizer merging across a turn boundary) is trained and reported the same way.
To train on thinking exactly as generated, use the token-in/token-out rollout mask
(:func:`gemma4.slime.loss_mask.rollout_loss_mask`).
"""

from __future__ import annotations

import bisect
import itertools
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemma4.chat import tokens as T
from gemma4.chat.templates import check_gemma4_template
from gemma4.errors import InvalidInputError
from gemma4.safe_read import check_depth

VALID_ROLES = ("system", "developer", "user", "assistant", "model", "tool")
MODEL_ROLES = ("assistant", "model")
MISMATCH_POLICIES = ("warn", "error", "ignore")
#: Deepest nesting of messages/tools accepted (the conversation list, a message, a tool call, its arguments,
#: nested argument values). The templates format arguments recursively, several Python frames per level.
MAX_CHAT_DEPTH = 32
#: transformers copies a message's reasoning from these fields (first non-null) into ``reasoning_content``.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTENT_ITEM_TYPES = ("text", "image", "audio", "video")


class RenderMismatchWarning(UserWarning):
    """What the template renders for a model message differs from the message (e.g. thinking stripped)."""


class RenderMismatchError(InvalidInputError):
    """Raised instead of :class:`RenderMismatchWarning` when ``on_mismatch="error"``."""


@dataclass(frozen=True)
class Segment:
    """A half-open character range ``[start, end)`` of the render and what produced it."""

    start: int
    end: int
    kind: str  # bos, header, system, reasoning, tool_call, tool_response, content, turn_close, newline
    message_index: int | None
    trainable: bool


@dataclass(frozen=True)
class MaskIssue:
    """A difference between what a model message holds and what is trained from it (or a tokenization that
    blurs a trained/untrained boundary); ``message_index`` is ``None`` for tokenizer-level issues."""

    message_index: int | None
    field: str
    detail: str

    def describe(self, source: str = "messages") -> str:
        """One line naming ``source`` (e.g. the messages file), the message and the field."""
        if self.message_index is None:
            return f"{source}: {self.field}: {self.detail}"
        return f"{source}[{self.message_index}].{self.field}: {self.detail}"

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class ChatMask:
    """The render of a conversation, its token ids, the per-token loss mask and how they were derived."""

    text: str
    input_ids: list[int]
    loss_mask: list[int]
    offsets: list[tuple[int, int]]
    segments: tuple[Segment, ...]
    issues: tuple[MaskIssue, ...]

    def trainable_char_spans(self) -> list[tuple[int, int]]:
        """Maximal ``[start, end)`` character ranges the policy marks trainable."""
        spans: list[tuple[int, int]] = []
        for seg in self.segments:
            if not seg.trainable or seg.end == seg.start:
                continue
            if spans and spans[-1][1] == seg.start:
                spans[-1] = (spans[-1][0], seg.end)
            else:
                spans.append((seg.start, seg.end))
        return spans

    def trained_text(self) -> list[str]:
        """The text of each maximal run of trainable tokens (for review and goldens)."""
        runs: list[str] = []
        for value, group in itertools.groupby(zip(self.loss_mask, self.offsets), key=lambda pair: pair[0]):
            if value:
                spans = [offset for _, offset in group]
                runs.append(self.text[spans[0][0] : max(end for _, end in spans)])
        return runs


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                yield f"{path}.{key}", key
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def _check_no_markers(value: Any, path: str, markers: Sequence[str]) -> None:
    for where, text in _strings(value, path):
        for marker in markers:
            if marker in text:
                raise InvalidInputError(
                    f"{where}: contains the control string {marker!r}; the tokenizer would read it as a turn or "
                    "tool-response boundary, so the turn layout (and the loss mask) would be ambiguous"
                )


def _check_content(content: Any, where: str, *, string_only: bool) -> None:
    if isinstance(content, str):
        return
    if string_only:
        raise InvalidInputError(
            f"{where}: must be a string (the Gemma 4 template writes a leading system/developer message's content "
            f"as text), got {type(content).__name__}"
        )
    if not isinstance(content, list):
        raise InvalidInputError(
            f"{where}: must be a string or a list of content parts, got {type(content).__name__}"
        )
    for k, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") not in _CONTENT_ITEM_TYPES:
            raise InvalidInputError(
                f"{where}[{k}]: expected an object with 'type' one of {list(_CONTENT_ITEM_TYPES)}"
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise InvalidInputError(f"{where}[{k}].text: a text part needs a string 'text'")


def _named_function(entry: Any) -> Mapping | None:
    """``entry['function']`` when it is a mapping with a non-empty string ``name`` (tool calls and tool
    declarations share this shape), else None."""
    function = entry.get("function") if isinstance(entry, Mapping) else None
    if isinstance(function, Mapping) and isinstance(function.get("name"), str) and function["name"]:
        return function
    return None


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise InvalidInputError(f"{where}: must be a list of tool calls, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        function = _named_function(call)
        if function is None:
            raise InvalidInputError(
                f"{where}[{j}]: expected {{'function': {{'name': str, 'arguments': object|str}}}} "
                "(the Gemma 4 template reads tool_call['function']['name'])"
            )
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, (Mapping, str)):
            raise InvalidInputError(
                f"{where}[{j}].function.arguments: must be an object or a string, got {type(arguments).__name__}"
            )
        _check_no_markers(call, f"{where}[{j}]", (*T.STRUCTURAL_STRINGS, T.TOOL_CALL_CLOSE))


def _check_tool_responses(responses: Any, where: str) -> None:
    if not isinstance(responses, list):
        raise InvalidInputError(f"{where}: must be a list of tool responses, got {type(responses).__name__}")
    for j, response in enumerate(responses):
        if not isinstance(response, Mapping) or "response" not in response:
            raise InvalidInputError(f"{where}[{j}]: expected {{'name': str, 'response': ...}}")
        name = response.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidInputError(f"{where}[{j}].name: must be a string, got {type(name).__name__}")


def validate_messages(messages: Any, source: str = "messages") -> list[dict[str, Any]]:
    """Check a conversation and return its messages normalised the way transformers normalises them
    (keys whose value is ``None`` dropped). Errors name ``source``, the message index and the field."""
    if isinstance(messages, Mapping) or not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError(f"{source}: expected a non-empty list of messages")
    normalized = []
    for i, raw in enumerate(messages):
        where = f"{source}[{i}]"
        if not isinstance(raw, Mapping):
            raise InvalidInputError(
                f"{where}: expected an object with 'role' and 'content', got {type(raw).__name__}"
            )
        message = {key: value for key, value in raw.items() if value is not None}
        role = message.get("role")
        if role is None:
            raise InvalidInputError(f"{where}: missing 'role'")
        if role not in VALID_ROLES:
            raise InvalidInputError(
                f"{where}.role: unknown role {role!r}; expected one of {list(VALID_ROLES)}"
            )
        tool_calls = message.get("tool_calls")
        tool_responses = message.get("tool_responses")
        if tool_calls is not None:
            if role not in MODEL_ROLES:
                raise InvalidInputError(
                    f"{where}.tool_calls: only assistant/model messages issue tool calls (role {role!r})"
                )
            _check_tool_calls(tool_calls, f"{where}.tool_calls")
        if tool_responses is not None:
            _check_tool_responses(tool_responses, f"{where}.tool_responses")
        if "content" in message:
            first_system = i == 0 and role in ("system", "developer")
            _check_content(message["content"], f"{where}.content", string_only=first_system)
        elif not (tool_responses or (tool_calls and role in MODEL_ROLES)):
            raise InvalidInputError(
                f"{where}: missing 'content' (role {role!r}; only messages with tool_calls or tool_responses may omit it)"
            )
        for field in REASONING_FIELDS:
            if field in message and not isinstance(message[field], str):
                raise InvalidInputError(
                    f"{where}.{field}: must be a string, got {type(message[field]).__name__}"
                )
        _check_no_markers(message, where, T.STRUCTURAL_STRINGS)
        normalized.append(message)
    return normalized


def validate_tools(tools: Any, source: str = "tools") -> list[dict[str, Any]] | None:
    """Check tool declarations (JSON-schema style, ``{"type": "function", "function": {"name": ...}}``)."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise InvalidInputError(f"{source}: expected a list of tool declarations, got {type(tools).__name__}")
    for j, tool in enumerate(tools):
        if _named_function(tool) is None:
            raise InvalidInputError(
                f"{source}[{j}]: expected {{'type': 'function', 'function': {{'name': ..., 'description': ..., "
                "'parameters': ...}}}"
            )
        _check_no_markers(tool, f"{source}[{j}]", T.STRUCTURAL_STRINGS)
    return list(tools)


def _tokenizer_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"tokenizer {name}" if name else "tokenizer"


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == text:
        return ids[0]
    return None


def check_tokenizer(tokenizer: Any) -> None:
    """Raise :class:`InvalidInputError` unless the tokenizer is fast (offsets), has a bos_token and encodes
    ``bos``, ``<|turn>`` and ``<turn|>`` as single tokens."""
    name = _tokenizer_name(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError(f"{name}: a fast tokenizer (tokenizer.json) is needed for character offsets")
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        raise InvalidInputError(
            f"{name}: no bos_token is set (tokenizer_config.json 'bos_token'); Gemma 4 templates start with it"
        )
    missing = [text for text in (bos, T.TURN_OPEN, T.TURN_CLOSE) if _single_token_id(tokenizer, text) is None]
    if missing:
        raise InvalidInputError(
            f"{name}: {', '.join(repr(m) for m in missing)} {'is' if len(missing) == 1 else 'are'} not a single "
            "token; the tokenizer must register the Gemma 4 special tokens"
        )


def resolve_chat_template(tokenizer: Any, chat_template: str | None, tools: Any = None) -> str:
    """The template text to use: ``chat_template`` if given, else the tokenizer's own; checked for Gemma 4."""
    if chat_template is not None:
        check_gemma4_template(chat_template, "chat template")
        return chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            f"{_tokenizer_name(tokenizer)}: has no chat template (chat_template.jinja or tokenizer_config.json); "
            "pass one with --chat-template"
        )
    try:
        template = tokenizer.get_chat_template(None, tools)
    except ValueError as exc:
        raise InvalidInputError(f"{_tokenizer_name(tokenizer)}: {exc}") from None
    check_gemma4_template(template, f"{_tokenizer_name(tokenizer)}: its chat template")
    return template


def _render(
    tokenizer: Any, messages: Any, tools: Any, template: str, enable_thinking: bool, tokenize: bool
) -> Any:
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            list(messages),
            tools=tools or None,
            chat_template=template,
            add_generation_prompt=False,
            tokenize=tokenize,
            enable_thinking=enable_thinking,
        )
    except jinja2.TemplateError as exc:
        raise InvalidInputError(f"chat template failed to render the conversation: {exc}") from None
    except RecursionError:
        raise InvalidInputError(
            "chat template failed to render the conversation: nested too deeply for the template's recursion"
        ) from None


class _Walker:
    """Cuts a render into :class:`Segment` s while checking it has the Gemma 4 turn layout."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.segments: list[Segment] = []

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def fail(self, what: str) -> InvalidInputError:
        found = self.text[self.pos : self.pos + 40]
        return InvalidInputError(
            f"{self.source}: the chat template's render does not have the Gemma 4 turn layout: {what} at character "
            f"{self.pos}, found {found!r}"
        )

    def take_to(self, end: int, kind: str, index: int | None, trainable: bool) -> None:
        if end > self.pos:
            self.segments.append(Segment(self.pos, end, kind, index, trainable))
        self.pos = end

    def expect(self, literal: str, kind: str, index: int | None, trainable: bool, what: str) -> None:
        if not self.at(literal):
            raise self.fail(f"expected {literal!r} ({what})")
        self.take_to(self.pos + len(literal), kind, index, trainable)

    def until(self, literal: str, what: str) -> int:
        """Index just past the next ``literal``."""
        found = self.text.find(literal, self.pos)
        if found < 0:
            raise self.fail(f"no {literal!r} closes {what}")
        return found + len(literal)

    def close_turn(self, index: int | None, trainable: bool) -> bool:
        if not self.at(T.TURN_CLOSE):
            return False
        self.expect(T.TURN_CLOSE, "turn_close", index, trainable, "end of turn")
        if self.at("\n"):
            self.take_to(self.pos + 1, "newline", index, False)
        return True


def _reasoning(message: Mapping[str, Any]) -> tuple[str, str | None]:
    for field in REASONING_FIELDS:
        if message.get(field) is not None:
            return field, message[field]
    return "reasoning_content", None


def _describe_drop(original: str, rendered: str | None) -> str:
    if T.CHANNEL_OPEN in original or T.CHANNEL_CLOSE in original:
        return (
            "the template strips the thinking (<|channel>…<channel|>) from model turns; the stripped text is in "
            "neither input_ids nor the loss mask"
        )
    if rendered is None or original.strip() == rendered:
        return "the template trims leading/trailing whitespace; the trimmed characters are not trained"
    return f"rendered as {rendered!r} instead of the given text"


def _model_message_issues(
    index: int, message: Mapping[str, Any], rendered_content: str, reasoning_rendered: bool
) -> list[MaskIssue]:
    issues = []
    field, reasoning = _reasoning(message)
    if reasoning and not reasoning_rendered:
        issues.append(
            MaskIssue(
                index,
                field,
                "not rendered by this chat template, so it is not trained (the standard Gemma 4 template never "
                "renders reasoning; the 31B interleaved one only for tool-calling model turns after the last "
                "user turn)",
            )
        )
    content = message.get("content")
    if isinstance(content, str):
        if content != rendered_content:
            issues.append(MaskIssue(index, "content", _describe_drop(content, rendered_content)))
    elif isinstance(content, list):
        cursor = 0
        for k, part in enumerate(content):
            if part.get("type") != "text":
                continue
            found = rendered_content.find(part["text"], cursor)
            if found < 0:
                issues.append(MaskIssue(index, f"content[{k}].text", _describe_drop(part["text"], None)))
            else:
                cursor = found + len(part["text"])
    return issues


def segment_render(
    text: str, messages: Sequence[Mapping[str, Any]], bos: str, source: str = "messages"
) -> tuple[list[Segment], list[MaskIssue]]:
    """Cut a Gemma 4 render of ``messages`` (normalised by :func:`validate_messages`) into segments that
    cover it exactly, and list the model messages whose render differs from their content."""
    walker = _Walker(text, source)
    issues: list[MaskIssue] = []
    walker.expect(bos, "bos", None, False, "the bos_token")
    first = 0
    system_header = f"{T.TURN_OPEN}system\n"
    if messages[0]["role"] in ("system", "developer") or walker.at(system_header):
        owner = 0 if messages[0]["role"] in ("system", "developer") else None
        walker.expect(system_header, "header", owner, False, "the system turn")
        close = walker.until(T.TURN_CLOSE, "the system turn") - len(T.TURN_CLOSE)
        walker.take_to(close, "system", owner, False)
        walker.close_turn(owner, False)
        first = 0 if owner is None else 1
    turn_open = after_tool_responses = False
    for index in range(first, len(messages)):
        message = messages[index]
        role = message["role"]
        trainable = role in MODEL_ROLES
        header = f"{T.TURN_OPEN}{T.MODEL_ROLE if role == 'assistant' else role}\n"
        if walker.at(header):
            walker.expect(header, "header", index, False, "turn header")
            turn_open = True
        elif not (turn_open or after_tool_responses):
            # Only a message after tool responses may come without a header: the interleaved template then
            # continues the current position (even after a closed turn), as its generation prompt does.
            raise walker.fail(f"expected {header!r} for message {index} (role {role!r})")
        after_tool_responses = bool(message.get("tool_responses"))
        _, reasoning = _reasoning(message)
        reasoning_rendered = False
        if reasoning and walker.at(T.THOUGHT_PREFIX + reasoning + T.CHANNEL_CLOSE):
            walker.take_to(
                walker.pos + len(T.THOUGHT_PREFIX + reasoning + T.CHANNEL_CLOSE),
                "reasoning",
                index,
                trainable,
            )
            reasoning_rendered = True
        for call in message.get("tool_calls") or ():
            prefix = f"{T.TOOL_CALL_OPEN}call:{call['function']['name']}{{"
            if not walker.at(prefix):
                raise walker.fail(f"expected {prefix!r} (a tool call of message {index})")
            walker.take_to(
                walker.until("}" + T.TOOL_CALL_CLOSE, "a tool call"), "tool_call", index, trainable
            )
        for _ in message.get("tool_responses") or ():
            if not walker.at(T.TOOL_RESPONSE_OPEN):
                raise walker.fail(f"expected {T.TOOL_RESPONSE_OPEN!r} (a tool response of message {index})")
            walker.take_to(
                walker.until(T.TOOL_RESPONSE_CLOSE, "a tool response"), "tool_response", index, False
            )
        content_start = walker.pos
        if message.get("content"):
            end = walker.until(T.TURN_CLOSE, f"the content of message {index}") - len(T.TURN_CLOSE)
            next_turn = text.find(T.TURN_OPEN, walker.pos)
            if 0 <= next_turn < end:
                walker.pos = next_turn
                raise walker.fail(f"a new turn starts before message {index} is closed with {T.TURN_CLOSE!r}")
            walker.take_to(end, "content", index, trainable)
        if trainable:
            issues.extend(
                _model_message_issues(index, message, text[content_start : walker.pos], reasoning_rendered)
            )
        if walker.close_turn(index, trainable):
            turn_open = False
    if walker.pos != len(text):
        raise walker.fail("unexpected text after the last message")
    return walker.segments, issues


def _check_control_tokens(
    text: str, bos: str, tokens: Sequence[str], offsets: Sequence[tuple[int, int]], name: str
) -> list[MaskIssue]:
    """Each control string in the render must be one token. ``bos`` and the turn markers delimit what is
    trained, so a failure there is an error; any other control string that is not one token still gets a
    correct mask (offsets), and is reported once as an issue."""
    markers = sorted({bos, *T.CONTROL_STRINGS}, key=len, reverse=True)
    starts = [start for start, _ in offsets]
    reported: dict[str, MaskIssue] = {}
    for match in re.finditer("|".join(re.escape(m) for m in markers), text):
        start, end = match.span()
        k = bisect.bisect_right(starts, start) - 1
        marker = match.group()
        if k >= 0 and offsets[k][1] >= end and tokens[k] == marker:
            continue
        message = (
            f"{marker!r} (written by the chat template at character {start}) is not a single token; the "
            "tokenizer must register the Gemma 4 special tokens"
        )
        if marker in (bos, T.TURN_OPEN, T.TURN_CLOSE):
            raise InvalidInputError(f"{name}: {message}")
        reported.setdefault(marker, MaskIssue(None, name, message))
    return list(reported.values())


def build_chat_mask(
    tokenizer: Any,
    messages: Any,
    tools: Any = None,
    *,
    enable_thinking: bool = False,
    chat_template: str | None = None,
    on_mismatch: str = "warn",
    source: str = "messages",
    tools_source: str = "tools",
) -> ChatMask:
    """Render ``messages`` with the Gemma 4 chat template and compute the per-token loss mask.

    ``chat_template`` is template text (default: the tokenizer's own). ``source``/``tools_source`` name the
    inputs in error messages (e.g. the file they came from). See the module docstring for the policy.
    """
    if on_mismatch not in MISMATCH_POLICIES:
        raise InvalidInputError(f"on_mismatch: {on_mismatch!r} is not one of {list(MISMATCH_POLICIES)}")
    # Templates render tool-call arguments recursively: bound the nesting before Jinja recurses.
    check_depth(messages, source, MAX_CHAT_DEPTH)
    check_depth(tools, tools_source, MAX_CHAT_DEPTH)
    normalized = validate_messages(messages, source)
    tools = validate_tools(tools, tools_source)
    check_tokenizer(tokenizer)
    template = resolve_chat_template(tokenizer, chat_template, tools)
    name = _tokenizer_name(tokenizer)
    bos = tokenizer.bos_token

    text = _render(tokenizer, normalized, tools, template, enable_thinking, tokenize=False)
    segments, issues = segment_render(text, normalized, bos, source)

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = [(int(s), int(e)) for s, e in encoding["offset_mapping"]]
    reference = _render(tokenizer, normalized, tools, template, enable_thinking, tokenize=True)["input_ids"]
    if list(reference) != input_ids:
        raise InvalidInputError(
            f"{name}: tokenizing the render gives different ids than apply_chat_template(tokenize=True); "
            "the loss mask would not line up with the training tokens"
        )
    token_strings = tokenizer.convert_ids_to_tokens(input_ids)
    issues.extend(_check_control_tokens(text, bos, token_strings, offsets, name))

    char_mask = [0] * (len(text) + 1)
    for seg in segments:
        if seg.trainable:
            char_mask[seg.start : seg.end] = [1] * (seg.end - seg.start)
    prefix = [0, *itertools.accumulate(char_mask)]
    loss_mask: list[int] = []
    for k, (start, end) in enumerate(offsets):
        if end > start:
            trained = prefix[end] - prefix[start]
            loss_mask.append(1 if trained else 0)
            if 0 < trained < end - start:
                issues.append(
                    MaskIssue(
                        None,
                        f"input_ids[{k}]",
                        f"token {token_strings[k]!r} (characters {start}..{end}) mixes trained and untrained "
                        "characters (the tokenizer merges across a turn boundary); it is trained",
                    )
                )
        else:
            loss_mask.append(loss_mask[-1] if loss_mask else 0)

    if issues and on_mismatch == "error":
        raise RenderMismatchError(
            f"{source}: what is trained differs from the messages:\n"
            + "\n".join(f"  {i.describe(source)}" for i in issues)
        )
    if on_mismatch == "warn":
        for issue in issues:
            warnings.warn(issue.describe(source), RenderMismatchWarning, stacklevel=2)
    return ChatMask(text, input_ids, loss_mask, offsets, tuple(segments), tuple(issues))


def gemma4_loss_mask(
    tokenizer: Any,
    messages: Any,
    tools: Any = None,
    *,
    enable_thinking: bool = False,
    chat_template: str | None = None,
    on_mismatch: str = "warn",
) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of a conversation; see :func:`build_chat_mask`."""
    result = build_chat_mask(
        tokenizer,
        messages,
        tools,
        enable_thinking=enable_thinking,
        chat_template=chat_template,
        on_mismatch=on_mismatch,
    )
    return result.input_ids, result.loss_mask

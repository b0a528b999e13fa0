"""A small, deterministic Gemma-4-like tokenizer for tests and goldens (no hub, no training).

It is built from code with the ``tokenizers`` library in the style of the Gemma tokenizers: spaces
normalised to ``▁``, no pre-tokenizer (so merges may cross what the template considers boundaries),
BPE with byte fallback (any text round-trips), every Gemma 4 control string registered as a special
token, and a post-processor that prepends ``<bos>`` (so forgetting ``add_special_tokens=False`` shows up as a
doubled ``<bos>``). Token ids of ``<pad>``/``<eos>``/``<bos>``/``<unk>``, ``<|tool_response>`` (50),
``<|turn>`` (105) and ``<turn|>`` (106) follow the released layout (facts §6.21); the rest are arbitrary.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from gemma4.atomic_io import atomic_write_text
from gemma4.chat import tokens as T

SPECIAL_TOKEN_IDS: dict[str, int] = {
    "<pad>": 0,
    "<eos>": 1,
    T.BOS: 2,
    "<unk>": 3,
    T.TOOL_OPEN: 46,
    T.TOOL_CLOSE: 47,
    T.TOOL_CALL_OPEN: 48,
    T.TOOL_CALL_CLOSE: 49,
    T.TOOL_RESPONSE_OPEN: 50,
    T.TOOL_RESPONSE_CLOSE: 51,
    T.STRING_QUOTE: 52,
    T.IMAGE: 60,
    T.AUDIO: 61,
    T.VIDEO: 62,
    T.THINK: 98,
    T.CHANNEL_OPEN: 100,
    T.CHANNEL_CLOSE: 101,
    T.TURN_OPEN: 105,
    T.TURN_CLOSE: 106,
}
_FIRST_FREE_ID = 107

# Multi-character pieces, merged left to right; earlier words get higher merge priority.
_WORDS = (
    "model",
    "user",
    "system",
    "developer",
    "tool",
    "thought",
    "call",
    "response",
    "declaration",
    "description",
    "parameters",
    "properties",
    "required",
    "type",
    "STRING",
    "OBJECT",
    "INTEGER",
    "value",
    "hello",
    "▁the",
    "▁is",
    "ing",
    "\n\n",
    "▁▁",
)


def _vocab_and_merges(merge_across_turns: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    filler = 0
    for token_id in range(_FIRST_FREE_ID):
        name = next((tok for tok, i in SPECIAL_TOKEN_IDS.items() if i == token_id), None)
        if name is None:
            name = f"<unused{filler}>"
            filler += 1
        vocab[name] = token_id
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in ["\n", "▁", *(c for c in string.printable if not c.isspace())]:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    if merge_across_turns:
        # "\n" + letter merges first, so "<|turn>model\nHi" tokenizes as "model", "\nH", "i": the header's
        # newline and the first character of the turn share a token.
        for letter in string.ascii_letters:
            merges.append(("\n", letter))
            vocab.setdefault("\n" + letter, len(vocab))
    for word in _WORDS:
        piece = word[0]
        for char in word[1:]:
            if (piece, char) not in merges:
                merges.append((piece, char))
            piece += char
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def build_tokenizer_json(*, merge_across_turns: bool = False, omit: Iterable[str] = ()) -> str:
    """The ``tokenizer.json`` text of the test tokenizer.

    ``merge_across_turns`` adds merges that join a header's newline with the next letter; ``omit`` leaves
    the given control strings out of the special tokens (they then tokenize as ordinary text).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    omitted = set(omit)
    vocab, merges = _vocab_and_merges(merge_across_turns)
    for name in omitted:
        vocab.pop(name, None)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = [
        tok for tok in sorted(SPECIAL_TOKEN_IDS, key=SPECIAL_TOKEN_IDS.__getitem__) if tok not in omitted
    ]
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in specials])
    if T.BOS not in omitted:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{T.BOS} $A", pair=f"{T.BOS} $A $B", special_tokens=[(T.BOS, SPECIAL_TOKEN_IDS[T.BOS])]
        )
    return tokenizer.to_str(pretty=True)


def build_test_tokenizer(
    directory: str | Path,
    *,
    chat_template: str | None = None,
    merge_across_turns: bool = False,
    omit: Iterable[str] = (),
) -> Path:
    """Write a Gemma-4-like HF tokenizer folder (``tokenizer.json``, ``tokenizer_config.json`` and, when
    ``chat_template`` is given, ``chat_template.jinja``) into ``directory`` and return it.

    The output is byte-for-byte deterministic, so goldens recorded with it can be re-checked anywhere.
    """
    directory = Path(directory)
    omitted = tuple(omit)
    atomic_write_text(
        directory / "tokenizer.json",
        build_tokenizer_json(merge_across_turns=merge_across_turns, omit=omitted),
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None if T.BOS in omitted else T.BOS,
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    config = {key: value for key, value in config.items() if value is not None}
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    if chat_template is not None:
        atomic_write_text(directory / "chat_template.jinja", chat_template)
    return directory

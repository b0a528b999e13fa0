"""Family ``chat``: the render, ``input_ids`` and ``loss_mask`` of every corpus conversation under both
released chat templates, with the deterministic test tokenizer of :mod:`harness.testing.chat`.

Cases are ``chat/<template>/<conversation>`` (``chat/standard/single_turn``): one per released template
(``standard``, ``interleaved_31b``) and conversation of :data:`harness.testing.chat_corpus.CASES`. Each is one JSON
file in the one store (``chat/standard/single_turn.<sha256[:12]>.json``), one top-level key per line so that
a diff is reviewable; the manifest entry carries the template's file and sha256 and the test tokenizer's
sha256 besides the common provenance.

The released templates are reference data that is not ours (``shared/reference/gemma4/``). Without them a
case cannot be computed: ``check`` reports it as *unavailable* (exit 4 with the lookup's message, never a
pass; leave the cases out with ``--only``) and ``record`` refuses (exit 2).

Checked exactly (no tolerance): the corpus inputs (messages, tools, ``enable_thinking``), the reference side
(``text`` as the template renders it, ``input_ids`` as the tokenizer encodes it) and our side (``loss_mask``,
``trained_text``, the reported ``issues``). A changed template, or a render/ids that HF's
``apply_chat_template`` itself no longer reproduces, is HF drift (the reference moved: review and re-record);
a changed mask, or a render that HF still reproduces but ours does not, is a regression.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4.errors import InvalidInputError
from harness.goldens.outcome import HF_DRIFT, PASS, REGRESSION, UNAVAILABLE, Outcome
from harness.goldens.registry import Recording
from harness.goldens.store import GoldenError, file_with_suffix, load_json_bytes
from harness.provenance import sha256_bytes, sha256_text
from harness.reference_data import REFERENCE_TEMPLATES, ReferenceDataUnavailable, load_reference_template

NAME = "chat"
DESCRIPTION = (
    "chat-template renders, input_ids and loss masks per released template and corpus conversation "
    "(needs the released templates: reference data under shared/)"
)
SUFFIX = ".json"
PAYLOAD_SCHEMA = 1  # the schema of a case file's JSON (unchanged since the goldens lived in gemma4.chat)
TOKENIZER_BUILDER = "harness.testing.chat.build_test_tokenizer"
_INPUTS = ("messages", "tools", "enable_thinking")
_REFERENCE = ("text", "input_ids")
_OURS = ("loss_mask", "trained_text", "issues")


@dataclass(frozen=True)
class ChatCase:
    """One chat golden: a corpus conversation rendered with a released template."""

    template: str
    conversation: str
    family: str = NAME

    @property
    def name(self) -> str:
        return f"{self.family}/{self.template}/{self.conversation}"

    def identity(self) -> dict[str, Any]:
        """The manifest fields that say which case an entry is."""
        return {"family": self.family, "template": self.template, "conversation": self.conversation}


def cases() -> list[ChatCase]:
    """Every released template x corpus conversation (listing them needs no reference data)."""
    from harness.testing.chat_corpus import CASES

    return [ChatCase(t, c.name) for t in REFERENCE_TEMPLATES for c in CASES]


def dumps(payload: dict[str, Any]) -> bytes:
    """A case file's bytes: one top-level key per line, values compact (reviewable diffs without one line per
    token id)."""
    items = [
        f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in payload.items()
    ]
    return ("{\n" + ",\n".join(items) + "\n}\n").encode("utf-8")


@functools.cache
def golden_tokenizer() -> tuple[Any, str]:
    """The goldens' deterministic test tokenizer (built once per process) and its tokenizer.json's sha256."""
    from gemma4.chat.tokenizer import load_tokenizer
    from harness.testing.chat import build_test_tokenizer

    with tempfile.TemporaryDirectory(prefix="gemma4-chat-goldens-") as tmp:
        directory = build_test_tokenizer(Path(tmp) / "tokenizer")
        sha = sha256_bytes((directory / "tokenizer.json").read_bytes())
        return load_tokenizer(directory), sha


def _conversation(case: ChatCase) -> Any:
    from harness.testing.chat_corpus import CASES

    for conv in CASES:
        if conv.name == case.conversation:
            return conv
    raise GoldenError(
        f"{case.name}: conversation {case.conversation!r} is not in harness.testing.chat_corpus"
    )


def template_text(case: ChatCase) -> str:
    """The released template of ``case``; :class:`ReferenceDataUnavailable` (an ``InvalidInputError``) with
    the lookup's message when the reference data is missing."""
    return load_reference_template(case.template)


def compute(case: ChatCase, template: str) -> dict[str, Any]:
    """The golden payload of ``case`` rendered with ``template`` (our mask code on the test tokenizer)."""
    from gemma4.chat.mask import build_chat_mask

    conv = _conversation(case)
    tokenizer, _ = golden_tokenizer()
    result = build_chat_mask(
        tokenizer,
        conv.messages,
        conv.tools,
        enable_thinking=conv.enable_thinking,
        chat_template=template,
        on_mismatch="ignore",
        source=f"{conv.name}: messages",
    )
    return {
        "schema_version": PAYLOAD_SCHEMA,
        "case": conv.name,
        "template": case.template,
        "template_sha256": sha256_text(template),
        "enable_thinking": conv.enable_thinking,
        "messages": conv.messages,
        "tools": conv.tools,
        "text": result.text,
        "input_ids": result.input_ids,
        "loss_mask": result.loss_mask,
        "trained_text": result.trained_text(),
        "issues": [issue.describe("messages") for issue in result.issues],
    }


def hf_reference(case: ChatCase, template: str) -> tuple[str, list[int]] | None:
    """HF's own render and ids of the conversation now (``apply_chat_template``, no mask code of ours), or
    ``None`` when HF cannot render it."""
    from gemma4.chat.mask import validate_messages, validate_tools

    conv = _conversation(case)
    tokenizer, _ = golden_tokenizer()
    kwargs = {
        "tools": validate_tools(conv.tools, "tools") or None,
        "chat_template": template,
        "add_generation_prompt": False,
        "enable_thinking": conv.enable_thinking,
    }
    messages = list(validate_messages(conv.messages, "messages"))
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    except Exception:  # the reference failing to render is the reference moving
        return None
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return text, list(ids)


def record(case: ChatCase) -> Recording:
    """The case's payload; needs the released template (refused with the lookup's message otherwise)."""
    try:
        template = template_text(case)
    except ReferenceDataUnavailable as exc:
        raise InvalidInputError(
            f"{case.name}: cannot record: {exc} (leave the chat cases out with --only)"
        ) from None
    payload = compute(case, template)
    _, tokenizer_sha = golden_tokenizer()
    return Recording(
        files={SUFFIX: dumps(payload)},
        fields={
            "inputs": {"kind": "harness.testing.chat_corpus conversation", "conversation": case.conversation},
            "tolerance": "exact",
            "template_file": REFERENCE_TEMPLATES.get(case.template, case.template),
            "template_sha256": payload["template_sha256"],
            "tokenizer": {"builder": TOKENIZER_BUILDER, "tokenizer_json_sha256": tokenizer_sha},
            "contents": {"fields": list(payload), "compared": [*_INPUTS, *_REFERENCE, *_OURS]},
        },
    )


def _payload(data: bytes, path: Path) -> dict[str, Any]:
    payload = load_json_bytes(data, path)
    if not isinstance(payload, dict):
        raise GoldenError(f"{path}: unreadable chat golden, expected a JSON object")
    if payload.get("schema_version") != PAYLOAD_SCHEMA:
        raise GoldenError(
            f"{path}: unknown chat golden schema_version {payload.get('schema_version')!r}; this harness reads "
            f"{PAYLOAD_SCHEMA}"
        )
    missing = [f for f in (*_INPUTS, *_REFERENCE, *_OURS) if f not in payload]
    if missing:
        raise GoldenError(f"{path}: unreadable chat golden, field {missing[0]!r} is missing")
    return payload


def first_difference(expected: Any, actual: Any) -> str:
    """Where two values first differ (index for lists)."""
    if isinstance(expected, list) and isinstance(actual, list):
        for k, (a, b) in enumerate(zip(expected, actual, strict=False)):
            if a != b:
                return f"first difference at [{k}]: golden {a!r}, now {b!r}"
        return f"length golden {len(expected)}, now {len(actual)}"
    return f"golden {expected!r}, now {actual!r}"


def _changes(golden: dict[str, Any], fresh: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    return [
        f"{f} changed: {first_difference(golden.get(f), fresh[f])}"
        for f in fields
        if golden.get(f) != fresh[f]
    ]


def describe_change(case: ChatCase, old_files: dict[str, bytes] | None, new: Recording) -> str:
    """Which fields of the case file changed."""
    fresh = json.loads(new.files[SUFFIX])
    if not old_files:
        return f"created {case.name} ({len(fresh['input_ids'])} tokens)"
    try:
        old = json.loads(next(v for k, v in old_files.items() if k.endswith(SUFFIX)))
    except (StopIteration, ValueError):
        return f"updated {case.name} (the old golden was unreadable)"
    changed = [f for f in fresh if old.get(f) != fresh[f]]
    return f"updated {case.name} ({', '.join(changed)})" if changed else f"unchanged {case.name}"


def check(case: ChatCase, entry: dict[str, Any], files: dict[str, bytes], goldens_dir: Path) -> Outcome:
    """Our mask code and HF's render now against the golden; exact comparison."""
    rel, data = file_with_suffix(files, SUFFIX, goldens_dir, case.name)
    golden = _payload(data, goldens_dir / rel)
    try:
        template = template_text(case)
    except ReferenceDataUnavailable as exc:
        return Outcome(case.name, UNAVAILABLE, f"cannot check {rel}: {exc}")
    try:
        fresh = compute(case, template)
    except InvalidInputError as exc:  # the golden's conversation rendered when recorded: ours refuses it now
        return Outcome(case.name, REGRESSION, f"our mask code now refuses the conversation of {rel}: {exc}")
    metrics = {"file": rel, "tokens": len(fresh["input_ids"])}
    recorded_sha = entry.get("template_sha256")
    template_moved = recorded_sha != fresh["template_sha256"]

    inputs = _changes(golden, fresh, _INPUTS)
    if inputs:
        return Outcome(
            case.name,
            REGRESSION,
            f"golden {rel} no longer matches the corpus conversation {case.conversation} "
            f"({', '.join(d.split(' ')[0] for d in inputs)}); review and re-record with --update",
            details=inputs,
            metrics=metrics,
        )
    reference = _changes(golden, fresh, _REFERENCE)
    ours = _changes(golden, fresh, _OURS)
    moved = (
        f"template {case.template} changed since recording (sha256 {str(recorded_sha)[:16]}... -> "
        f"{fresh['template_sha256'][:16]}...)"
    )
    if not reference and not ours:
        if template_moved:
            return Outcome(
                case.name,
                HF_DRIFT,
                f"{moved}; ids and masks still match golden {rel}: review and re-record with --update",
                metrics=metrics,
            )
        return Outcome(
            case.name,
            PASS,
            f"render, {metrics['tokens']} ids and loss mask match golden {rel}",
            metrics=metrics,
        )
    if reference:
        hf = hf_reference(case, template)
        hf_ok = hf is not None and hf == (golden["text"], golden["input_ids"])
        if template_moved or not hf_ok:
            why = moved if template_moved else "HF's apply_chat_template no longer reproduces its render/ids"
            return Outcome(
                case.name,
                HF_DRIFT,
                f"the reference moved away from golden {rel}: {why}; review and re-record with --update",
                details=reference + ours,
                metrics=metrics,
            )
        return Outcome(
            case.name,
            REGRESSION,
            f"our render moved away from golden {rel} while HF still reproduces it: {reference[0]}",
            details=reference + ours,
            metrics=metrics,
        )
    return Outcome(
        case.name,
        REGRESSION,
        f"our loss mask moved away from golden {rel}: {ours[0]}",
        details=ours,
        metrics=metrics,
    )

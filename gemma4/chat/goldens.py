"""Chat-mask goldens: the render, ``input_ids`` and ``loss_mask`` of every corpus conversation under both
reference templates, with the deterministic test tokenizer of :mod:`gemma4.chat.testing`.

``goldens_dir`` is the directory of the chat goldens (``goldens/chat`` in the repository). Record explicitly,
check on every run::

    python -m gemma4.chat.goldens record [--update] [--dir DIR]
    python -m gemma4.chat.goldens check [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gemma4.chat._io import atomic_write_text
from gemma4.chat.corpus import CASES, Case
from gemma4.chat.templates import REFERENCE_TEMPLATES, REPO_ROOT, load_reference_template, sha256_text
from gemma4.errors import InvalidInputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_DIR = REPO_ROOT / "goldens" / "chat"
_COMPARED = ("text", "input_ids", "loss_mask", "trained_text", "issues")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dumps(record: dict[str, Any]) -> str:
    # One top-level key per line, values compact: reviewable diffs without one line per token id.
    items = [f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in record.items()]
    return "{\n" + ",\n".join(items) + "\n}\n"


def _versions() -> dict[str, str]:
    import jinja2
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "jinja2": jinja2.__version__,
    }


def _relative(path: Path, goldens_dir: Path) -> str:
    return path.relative_to(goldens_dir).as_posix()


def _case_file(goldens_dir: Path, template: str, case: Case) -> Path:
    return goldens_dir / template / f"{case.name}.json"


def _compute(templates: dict[str, str]) -> tuple[dict[tuple[str, str], dict[str, Any]], str]:
    """Golden records of every (template, case) and the sha256 of the test tokenizer's tokenizer.json."""
    from gemma4.chat.mask import build_chat_mask
    from gemma4.chat.testing import build_test_tokenizer
    from gemma4.chat.tokenizer import load_tokenizer

    records: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gemma4-chat-goldens-") as tmp:
        directory = build_test_tokenizer(Path(tmp) / "tokenizer")
        tokenizer_sha = _sha256_bytes((directory / "tokenizer.json").read_bytes())
        tokenizer = load_tokenizer(directory)
        for template_name, template in templates.items():
            for case in CASES:
                result = build_chat_mask(
                    tokenizer,
                    case.messages,
                    case.tools,
                    enable_thinking=case.enable_thinking,
                    chat_template=template,
                    on_mismatch="ignore",
                    source=f"{case.name}: messages",
                )
                records[(template_name, case.name)] = {
                    "schema_version": SCHEMA_VERSION,
                    "case": case.name,
                    "template": template_name,
                    "template_sha256": sha256_text(template),
                    "enable_thinking": case.enable_thinking,
                    "messages": case.messages,
                    "tools": case.tools,
                    "text": result.text,
                    "input_ids": result.input_ids,
                    "loss_mask": result.loss_mask,
                    "trained_text": result.trained_text(),
                    "issues": [issue.describe("messages") for issue in result.issues],
                }
    return records, tokenizer_sha


def record(goldens_dir: Path, update: bool = False) -> list[str]:
    """Record the chat goldens into ``goldens_dir`` (atomically, file by file, manifest last).

    Refuses to overwrite an existing golden or manifest unless ``update``; with ``update``, goldens of cases no
    longer in the corpus are removed. Returns one human-readable line per file.
    """
    goldens_dir = Path(goldens_dir)
    templates = {name: load_reference_template(name) for name in REFERENCE_TEMPLATES}
    records, tokenizer_sha = _compute(templates)
    targets = {
        key: _case_file(goldens_dir, key[0], next(c for c in CASES if c.name == key[1])) for key in records
    }
    manifest_path = goldens_dir / MANIFEST
    if not update:
        existing = [path for path in [*targets.values(), manifest_path] if path.exists()]
        if existing:
            raise InvalidInputError(
                f"{existing[0]}: golden already exists ({len(existing)} existing file(s)); goldens are evidence and are "
                "only overwritten with `python -m gemma4.chat.goldens record --update`"
            )
    changes: list[str] = []
    cases = []
    for key, payload in records.items():
        path = targets[key]
        text = _dumps(payload)
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old is None:
            changes.append(f"created {path}")
        elif old != text:
            try:
                previous = json.loads(old)
                fields = [f for f in payload if previous.get(f) != payload[f]]
            except json.JSONDecodeError:
                fields = ["unreadable before"]
            changes.append(f"updated {path} ({', '.join(fields)})")
        else:
            changes.append(f"unchanged {path}")
        if old != text:
            atomic_write_text(path, text)
        cases.append(
            {
                "name": key[1],
                "template": key[0],
                "file": _relative(path, goldens_dir),
                "sha256": _sha256_bytes(text.encode("utf-8")),
            }
        )
    if update:
        for stale in sorted(goldens_dir.glob("*/*.json")):
            if stale not in targets.values():
                stale.unlink()
                changes.append(f"removed {stale} (no longer in the corpus)")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "description": "Gemma 4 chat-template loss masks: render, input_ids and loss_mask per case and template",
        "command": shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "producer": {**_versions(), "platform": platform.platform()},
        "tokenizer": {
            "builder": "gemma4.chat.testing.build_test_tokenizer",
            "tokenizer_json_sha256": tokenizer_sha,
        },
        "templates": {
            name: {"file": REFERENCE_TEMPLATES[name], "sha256": sha256_text(text)}
            for name, text in templates.items()
        },
        "cases": cases,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    changes.append(f"wrote {manifest_path}")
    return changes


def _first_difference(expected: Any, actual: Any) -> str:
    if isinstance(expected, list) and isinstance(actual, list):
        for k, (a, b) in enumerate(zip(expected, actual)):
            if a != b:
                return f"first difference at [{k}]: golden {a!r}, now {b!r}"
        return f"length golden {len(expected)}, now {len(actual)}"
    return f"golden {expected!r}, now {actual!r}"


def check(goldens_dir: Path) -> list[str]:
    """Problems with the chat goldens in ``goldens_dir`` (empty when they all match a fresh computation).

    A missing, unreadable or corrupt (sha256 mismatch) file, a changed reference template, a case missing
    from or unknown to the corpus, and any difference in text, ``input_ids`` or ``loss_mask`` is a problem.
    """
    goldens_dir = Path(goldens_dir)
    manifest_path = goldens_dir / MANIFEST
    problems: list[str] = []
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("schema_version") != SCHEMA_VERSION:
            return [
                f"{manifest_path}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}"
            ]
        entries = {(entry["template"], entry["name"]): entry for entry in manifest["cases"]}
    except FileNotFoundError:
        return [f"{manifest_path}: missing (record with `python -m gemma4.chat.goldens record`)"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        return [f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc})"]

    templates: dict[str, str] = {}
    for name in REFERENCE_TEMPLATES:
        try:
            templates[name] = load_reference_template(name)
        except InvalidInputError as exc:
            problems.append(str(exc))
            continue
        recorded = manifest.get("templates", {}).get(name, {}).get("sha256")
        if recorded != sha256_text(templates[name]):
            problems.append(
                f"{manifest_path}: template {name} changed since recording (sha256 {recorded} -> "
                f"{sha256_text(templates[name])}); review and re-record with --update"
            )
    if problems:
        return problems

    # The tokenizer's sha256 is provenance only: tokenizers releases may serialise the same tokenizer
    # differently, and what matters (ids and masks of every case) is compared below.
    records, _ = _compute(templates)
    for key in sorted(set(records) - set(entries)):
        problems.append(f"{manifest_path}: golden missing for case {key[1]} under template {key[0]}")
    for key in sorted(set(entries) - set(records)):
        problems.append(f"{manifest_path}: golden {entries[key].get('file')} is not a corpus case")
    for key in sorted(set(records) & set(entries)):
        entry = entries[key]
        path = goldens_dir / str(entry.get("file"))
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path}: missing or unreadable golden ({exc.strerror or exc})")
            continue
        if _sha256_bytes(data) != entry.get("sha256"):
            problems.append(
                f"{path}: corrupt golden (sha256 {_sha256_bytes(data)} != manifest {entry.get('sha256')})"
            )
            continue
        try:
            golden = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{path}: unreadable golden ({exc})")
            continue
        fresh = records[key]
        for field in ("messages", "tools", "enable_thinking"):
            if golden.get(field) != fresh[field]:
                problems.append(
                    f"{path}: {field} differ from the corpus case {key[1]}; re-record with --update"
                )
        for field in _COMPARED:
            if golden.get(field) != fresh[field]:
                problems.append(
                    f"{path}: {field} changed: {_first_difference(golden.get(field), fresh[field])}"
                )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gemma4.chat.goldens {record,check}``; exit 0 ok, 1 check failed, 2 invalid input."""
    parser = argparse.ArgumentParser(
        prog="python -m gemma4.chat.goldens", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("--update", action="store_true", help="record: overwrite existing goldens")
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"goldens directory (default {DEFAULT_DIR})"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "record":
            for line in record(args.dir, update=args.update):
                print(line)
            return 0
        problems = check(args.dir)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(problems)} problem(s)" if problems else "chat goldens OK")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

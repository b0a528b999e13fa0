"""Goldens: the committed ones match a fresh computation, and check() catches every kind of damage.

The goldens were recorded with the released templates (reference data): tests that compute them need it and
skip (fail in CI, ``GEMMA4_REQUIRE_SHARED=1``) without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gemma4.chat import goldens
from gemma4.chat.corpus import CASES
from gemma4.chat.templates import REFERENCE_TEMPLATES, SHARED_DIR_ENV, reference_dir
from gemma4.errors import InvalidInputError

NEEDS_RELEASED = pytest.mark.usefixtures("released_templates")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    target = tmp_path / "chat"
    shutil.copytree(goldens.DEFAULT_DIR, target)
    return target


@NEEDS_RELEASED
def test_committed_goldens_match_the_real_templates() -> None:
    manifest = json.loads((goldens.DEFAULT_DIR / goldens.MANIFEST).read_text(encoding="utf-8"))
    assert len(manifest["cases"]) == len(CASES) * len(REFERENCE_TEMPLATES)
    assert set(manifest["producer"]) >= {"python", "transformers", "tokenizers", "jinja2", "platform"}
    assert "record" in manifest["command"]
    assert goldens.check(goldens.DEFAULT_DIR) == []


@NEEDS_RELEASED
def test_check_reports_corrupt_changed_and_missing_goldens(copy: Path) -> None:
    corrupt = copy / "standard" / "single_turn.json"
    corrupt.write_bytes(corrupt.read_bytes().replace(b"How can I help", b"How can I hurt"))

    changed = copy / "interleaved_31b" / "tools_openai_style.json"
    record = json.loads(changed.read_text(encoding="utf-8"))
    first = record["loss_mask"].index(1)
    record["loss_mask"][first - 1] = 1  # the header's newline, trained: the off-by-one the goldens must catch
    changed.write_text(goldens._dumps(record), encoding="utf-8")
    manifest_path = copy / goldens.MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for entry in manifest["cases"]:
        if entry["file"] == "interleaved_31b/tools_openai_style.json":
            entry["sha256"] = goldens._sha256_bytes(changed.read_bytes())
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    (copy / "standard" / "unicode.json").unlink()

    problems = goldens.check(copy)
    assert len(problems) == 3, problems
    assert problems[0].startswith(
        f"{copy / 'interleaved_31b' / 'tools_openai_style.json'}: loss_mask changed"
    )
    assert f"first difference at [{first - 1}]: golden 1, now 0" in problems[0]
    assert problems[1].startswith(f"{copy / 'standard' / 'single_turn.json'}: corrupt golden (sha256")
    assert problems[2].startswith(f"{copy / 'standard' / 'unicode.json'}: missing or unreadable golden")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(lambda m: m.unlink(), "manifest.json: missing (record with", id="missing"),
        pytest.param(
            lambda m: m.write_text("{", encoding="utf-8"), "manifest.json: unreadable manifest", id="garbage"
        ),
        pytest.param(
            lambda m: m.write_text(json.dumps({"schema_version": 99}), encoding="utf-8"),
            "manifest.json: schema_version 99",
            id="schema",
        ),
    ],
)
def test_check_reports_a_bad_manifest(copy: Path, damage: object, expected: str) -> None:
    damage(copy / goldens.MANIFEST)  # type: ignore[operator]
    problems = goldens.check(copy)
    assert len(problems) == 1 and expected in problems[0]


@NEEDS_RELEASED
def test_check_reports_a_changed_template(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared" / "reference" / "gemma4"
    shutil.copytree(reference_dir(), shared)
    standard = shared / REFERENCE_TEMPLATES["standard"]
    standard.chmod(0o644)
    standard.write_text(standard.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "shared"))
    problems = goldens.check(copy)
    assert len(problems) == 1 and "template standard changed since recording" in problems[0]
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "nowhere"))
    problems = goldens.check(copy)
    assert len(problems) == len(REFERENCE_TEMPLATES)
    assert all("reference data not available" in p and f"set {SHARED_DIR_ENV}=" in p for p in problems)


@NEEDS_RELEASED
def test_record_refuses_to_overwrite_and_updates_on_request(tmp_path: Path) -> None:
    target = tmp_path / "fresh"
    lines = goldens.record(target)
    assert sum(line.startswith("created ") for line in lines) == len(CASES) * len(REFERENCE_TEMPLATES)
    assert goldens.check(target) == []
    before = (target / "standard" / "single_turn.json").read_bytes()
    with pytest.raises(InvalidInputError, match="golden already exists.*--update"):
        goldens.record(target)
    stale = target / "standard" / "retired_case.json"
    stale.write_text("{}", encoding="utf-8")
    lines = goldens.record(target, update=True)
    assert sum(line.startswith("unchanged ") for line in lines) == len(CASES) * len(REFERENCE_TEMPLATES)
    assert f"removed {stale} (no longer in the corpus)" in lines and not stale.exists()
    assert (target / "standard" / "single_turn.json").read_bytes() == before
    assert not list(target.rglob("*.tmp"))


@NEEDS_RELEASED
def test_goldens_module_entry_point(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert goldens.main(["check", "--dir", str(copy)]) == 0
    (copy / "standard" / "unicode.json").write_text("{}", encoding="utf-8")
    assert goldens.main(["check", "--dir", str(copy)]) == 1
    assert "unicode.json: corrupt golden" in capsys.readouterr().err
    assert goldens.main(["record", "--dir", str(copy)]) == 2


@NEEDS_RELEASED
def test_check_reports_cases_missing_from_or_unknown_to_the_manifest(copy: Path) -> None:
    manifest_path = copy / goldens.MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    dropped = manifest["cases"].pop(0)
    manifest["cases"].append({**dropped, "name": "retired", "file": "standard/retired.json"})
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    problems = goldens.check(copy)
    assert problems == [
        f"{manifest_path}: golden missing for case {dropped['name']} under template {dropped['template']}",
        f"{manifest_path}: golden standard/retired.json is not a corpus case",
    ]

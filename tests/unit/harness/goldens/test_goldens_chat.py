"""The chat family in the one store: cases ``chat/<template>/<conversation>``, recorded and checked like every
other family. A planted corrupt file is a broken golden (exit 4), a planted mask change a regression (exit 1),
a changed template HF drift (exit 3), missing templates "unavailable" (exit 4, never a pass); the pytest gate
re-records only with ``--goldens-update``.

Computing a chat golden needs the released templates (reference data): these tests skip without them (fail
under ``GEMMA4_REQUIRE_SHARED=1``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import harness.cli
from harness.goldens import chat
from harness.goldens.check import check_case, gate_case
from harness.goldens.outcome import HF_DRIFT, INTEGRITY, PASS, UNAVAILABLE
from harness.goldens.record import record_goldens
from harness.goldens.store import read_manifest, sha256_bytes, write_manifest
from harness.reference_data import REFERENCE_TEMPLATES, SHARED_DIR_ENV, reference_dir
from harness.testing.chat_corpus import CASES

MASKED = "chat/interleaved_31b/tools_openai_style"
SMALL = "chat/standard/single_turn"


@pytest.fixture(scope="module")
def released(require_reference: Callable[[str], Path]) -> None:
    for name in REFERENCE_TEMPLATES.values():
        require_reference(f"gemma4/{name}")


@pytest.fixture(scope="module")
def chat_recorded(released: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chat") / "goldens"
    record_goldens(directory, [SMALL, MASKED], command="pytest fixture")
    return directory


@pytest.fixture
def chat_goldens(chat_recorded: Path, tmp_path: Path) -> Path:
    target = tmp_path / "goldens"
    shutil.copytree(chat_recorded, target)
    return target


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], int]:
    monkeypatch.setattr(harness.cli, "COMMAND_MODULES", ("harness.commands.goldens",))
    return harness.cli.main


def case_file(goldens: Path, name: str) -> Path:
    (rel,) = read_manifest(goldens)["cases"][name]["files"]
    return goldens / rel


def test_cases_are_every_template_and_conversation():
    names = [c.name for c in chat.cases()]
    assert len(names) == len(CASES) * len(REFERENCE_TEMPLATES) == len(set(names))
    assert SMALL in names and MASKED in names
    assert all(n.count("/") == 2 and n.startswith("chat/") for n in names)


def test_record_and_check_round_trip(chat_goldens: Path, cli, capsys):
    entry = read_manifest(chat_goldens)["cases"][SMALL]
    assert entry["family"] == "chat" and entry["template"] == "standard" and entry["tolerance"] == "exact"
    assert case_file(chat_goldens, SMALL).name.startswith("single_turn.")
    assert (
        cli(["goldens", "check", "--only", "chat", "--goldens-dir", str(chat_goldens)]) == 4
    )  # 24 unrecorded
    capsys.readouterr()
    argv = ["goldens", "check", "--only", SMALL, "--only", MASKED, "--goldens-dir", str(chat_goldens)]
    assert cli(argv) == 0
    assert f"ok            {SMALL}" in capsys.readouterr().out
    assert cli(["goldens", "record", "--only", SMALL, "--goldens-dir", str(chat_goldens)]) == 2
    assert f"golden {SMALL!r} already exists" in capsys.readouterr().err
    assert cli(["goldens", "record", "--only", SMALL, "--update", "--goldens-dir", str(chat_goldens)]) == 0
    assert f"unchanged {SMALL}" in capsys.readouterr().out


def test_planted_corrupt_chat_golden_is_exit_4(chat_goldens: Path, cli, capsys):
    victim = case_file(chat_goldens, SMALL)
    victim.write_bytes(victim.read_bytes().replace(b"How can I help", b"How can I hurt"))
    assert cli(["goldens", "check", "--only", SMALL, "--goldens-dir", str(chat_goldens)]) == 4
    out = capsys.readouterr().out
    assert f"BROKEN GOLDEN {SMALL}" in out and f"{victim}: corrupt golden file of case {SMALL!r}" in out


def test_planted_mask_change_is_a_regression(chat_goldens: Path, cli, capsys):
    victim = case_file(chat_goldens, MASKED)
    payload = json.loads(victim.read_bytes())
    first = payload["loss_mask"].index(1)
    payload["loss_mask"][first - 1] = (
        1  # the header's newline, trained: the off-by-one the goldens must catch
    )
    data = chat.dumps(payload)
    victim.write_bytes(data)
    manifest = read_manifest(chat_goldens)
    manifest["cases"][MASKED]["files"] = {victim.relative_to(chat_goldens).as_posix(): sha256_bytes(data)}
    write_manifest(chat_goldens, manifest)
    assert cli(["goldens", "check", "--only", MASKED, "--goldens-dir", str(chat_goldens)]) == 1
    out = capsys.readouterr().out
    assert f"REGRESSION    {MASKED}" in out and "our loss mask moved away from golden" in out
    assert f"loss_mask changed: first difference at [{first - 1}]: golden 1, now 0" in out


def test_changed_template_is_hf_drift_and_missing_templates_unavailable(
    chat_goldens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shared = tmp_path / "shared" / "reference" / "gemma4"
    shutil.copytree(reference_dir(), shared)
    standard = shared / REFERENCE_TEMPLATES["standard"]
    standard.chmod(0o644)
    standard.write_text(standard.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "shared"))
    o = check_case(chat_goldens, SMALL)
    assert o.status == HF_DRIFT and "template standard changed since recording" in o.message, o.message
    assert check_case(chat_goldens, MASKED).status == PASS

    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "nowhere"))
    o = check_case(chat_goldens, SMALL)
    assert (
        o.status == UNAVAILABLE
        and "reference data not available" in o.message
        and SHARED_DIR_ENV in o.message
    )
    assert check_case(chat_goldens, "chat/standard/unicode").status == INTEGRITY  # not recorded: still broken
    from harness.goldens.check import check_goldens

    assert check_goldens(chat_goldens, [SMALL]).exit_code == 4
    from gemma4.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="cannot record: reference data not available"):
        record_goldens(tmp_path / "fresh", [SMALL])
    assert not (tmp_path / "fresh" / "manifest.json").exists()


def test_goldens_update_rewrites_only_on_request(chat_goldens: Path):
    victim = case_file(chat_goldens, SMALL)
    victim.write_bytes(b"{}")
    before = (chat_goldens / "manifest.json").read_bytes()
    verdict, message = gate_case(chat_goldens, SMALL, update=False)
    assert verdict == "fail" and message.startswith(f"{SMALL}: integrity: {victim}: corrupt golden file")
    assert victim.read_bytes() == b"{}" and (chat_goldens / "manifest.json").read_bytes() == before
    verdict, message = gate_case(chat_goldens, SMALL, update=True)
    assert verdict == "fail" and message.startswith(f"golden {SMALL} rewritten; review the diff and rerun")
    assert f"replaced {SMALL}: the old golden was broken" in message
    entry = read_manifest(chat_goldens)["cases"][SMALL]
    assert entry["command"] == "pytest --goldens-update" and not victim.exists()
    assert gate_case(chat_goldens, SMALL, update=True)[0] == "pass"  # green on the rerun, nothing rewritten

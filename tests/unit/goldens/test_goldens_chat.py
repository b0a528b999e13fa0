"""The chat family is recorded and checked through ``gemma4.chat.goldens``; its absence is reported, not fatal."""

from __future__ import annotations

import json

import harness.goldens.chat as chat_family
from harness.cli import main


def test_chat_family_round_trip_and_damage(tmp_path, capsys):
    goldens = tmp_path / "goldens"
    assert main(["goldens", "record", "--only", "chat", "--goldens-dir", str(goldens)]) == 0
    assert "chat: " in capsys.readouterr().out
    assert main(["goldens", "check", "--only", "chat", "--goldens-dir", str(goldens)]) == 0
    capsys.readouterr()

    manifest = json.loads((goldens / "chat" / "manifest.json").read_text())
    victim = goldens / "chat" / manifest["cases"][0]["file"]
    victim.write_text(victim.read_text().replace('"loss_mask": [0', '"loss_mask": [1', 1))
    assert main(["goldens", "check", "--only", "chat", "--goldens-dir", str(goldens)]) == 4
    assert f"{victim}: corrupt golden" in capsys.readouterr().out

    assert main(["goldens", "record", "--only", "chat", "--goldens-dir", str(goldens)]) == 2
    assert "golden 'chat' already exists" in capsys.readouterr().err


def test_missing_chat_module_is_reported_and_the_rest_still_checked(recorded, monkeypatch, capsys):
    monkeypatch.setattr(chat_family, "MODULE", "gemma4.chat.no_such_module")
    rc = main(
        [
            "goldens",
            "check",
            "--only",
            "chat",
            "--only",
            "rope/tiny-12b/float32",
            "--goldens-dir",
            str(recorded),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 4
    assert (
        "chat" in out
        and "family missing: gemma4.chat.no_such_module cannot be imported (ModuleNotFoundError" in out
    )
    assert "ok            rope/tiny-12b/float32" in out

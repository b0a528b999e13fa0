"""A parity result names the implementation it checked (summary, JSON, CLI output), so a plugin's result is
never read as ours. Catches: a summary or JSON without the implementation's name, or one that names ours
for a plugin's run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import harness.impls as impls
from harness.cli import main
from harness.parity import resolve_source, run_parity
from harness.parity.impl import OURS


@pytest.fixture(scope="module")
def source():
    return resolve_source(preset="tiny-12b")


@pytest.mark.parametrize("name", ["gemma4-mcore", "someone-elses-port"])
def test_summary_and_json_name_the_implementation(source, name):
    impl = OURS if name == OURS.name else dataclasses.replace(OURS, name=name)
    r = run_parity(source, torch.float64, seq_len=4, impl=impl)
    assert r.passed and r.impl == name
    first, second = r.summary().splitlines()[:2]
    assert f"impl={name} " in first
    assert second.strip() == f"checked     {name} against HF transformers (the oracle)"
    assert r.to_json()["impl"] == name
    other = "someone-elses-port" if name == OURS.name else OURS.name
    assert f"impl={other}" not in r.summary()


def test_cli_prints_and_writes_the_implementation(tmp_path, monkeypatch, capsys):
    plugin = dataclasses.replace(OURS, name="cli-plugin")
    monkeypatch.setitem(impls.IMPLS, "cli-plugin", lambda: plugin)
    out = tmp_path / "r.json"
    argv = ["parity", "--preset", "tiny-12b", "--seq-len", "4", "--impl", "cli-plugin", "--json", str(out)]
    assert main(argv) == 0
    assert "impl=cli-plugin" in capsys.readouterr().out
    assert json.loads(out.read_text())["impl"] == "cli-plugin"

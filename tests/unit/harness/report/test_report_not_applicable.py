"""Rows an implementation under test declares it cannot run are *not applicable*: shown (with its reason),
counted, never a failure, never dropped; the exit code is decided by the applicable rows only; and an
implementation that declares support and then cannot deliver still fails.

The implementations here are thin plugins around our own model (no reference data needed): they declare
what they cannot run through ``supports`` / ``supports_run``, and the planted ones lie about it.

What each test catches: an n/a row counted as a failure (exit 1 for a passing plugin) or silently dropped
(row/headline/JUnit counts); an n/a row that hides a failing applicable row (exit 0); a plugin that declares
support and then refuses (or breaks) being shown as n/a instead of failing.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness.impls as impls
from harness.cli import main
from harness.parity.impl import OURS
from harness.parity.run import UnsupportedByImplementation

NO_TP = "tensor parallelism is not written in this plugin"


@dataclass(frozen=True)
class NoTensorParallel:
    """Our model under another name, declaring that it cannot run TP > 1."""

    name: str = "no-tp-plugin"
    precision: str = "mirrored"
    scale_logits: float = 1.0  # a planted bug when != 1
    refuse_in_run: bool = False  # a planted lie: declares support for tp1, then refuses it while running

    def supports(self, spec) -> str | None:
        return None

    def supports_run(self, layout, grads: bool) -> str | None:
        return NO_TP if layout.tp > 1 else None

    def run(self, rank, world, spec, dtype, full_weights, seq, layout, ref_grads):
        if self.refuse_in_run:
            raise UnsupportedByImplementation("refused at run time", "refused at run time")
        result = OURS.run(rank, world, spec, dtype, full_weights, seq, layout, ref_grads)
        result.logits = result.logits * self.scale_logits
        return result


def _report(tmp_path: Path, impl_name: str) -> tuple[int, str, dict, ET.Element]:
    out = tmp_path / "report"
    argv = ["report", "--out", str(out), "--junit", str(tmp_path / "junit.xml"), "--preset", "tiny-12b"]
    argv += ["--dtype", "float64", "--layout", "tp1", "--layout", "tp2", "--seq-len", "8", "--no-goldens"]
    argv += ["--impl", impl_name]
    rc = main(argv)
    md = (out / "summary.md").read_text()
    results = json.loads((out / "results.json").read_text())
    return rc, md, results, ET.parse(tmp_path / "junit.xml").getroot()


@pytest.fixture
def plugin(monkeypatch):
    def register(**kw) -> str:
        impl = NoTensorParallel(**kw)
        monkeypatch.setitem(impls.IMPLS, impl.name, lambda: impl)
        return impl.name

    return register


def test_declared_unsupported_layout_is_not_applicable_not_a_failure(tmp_path, plugin, capsys):
    rc, md, results, junit = _report(tmp_path, plugin())
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "PASS" in stdout and "1 parity row(s) applicable, 1 not applicable" in stdout
    assert f"n/a tiny-12b float64 tp2: {NO_TP}" in stdout
    assert "2 parity runs (1 applicable, 1 not applicable to no-tp-plugin)" in md
    assert "Implementation under test: no-tp-plugin (not this repo's model)" in md
    assert "## Parity: no-tp-plugin vs HF" in md
    assert f"| tiny-12b | float64 | tp2 |  |  |  |  |  | not applicable: {NO_TP} | n/a |" in md
    assert "| tiny-12b | float64 | tp1 | fp64-exact-cross-framework |" in md
    assert f"not applicable: {NO_TP}" in md.split("## Layout equivalence")[1]  # equivalence: n/a, not FAIL
    rows = {r["layout"]: r for r in results["rows"]}
    assert rows["tp2"]["status"] == "n/a" and rows["tp2"]["not_applicable"] == NO_TP
    assert rows["tp2"]["pass"] is None and rows["tp1"]["pass"] is True
    assert results["settings"]["impl"] == "no-tp-plugin" and results["failures"] == []
    parity = next(s for s in junit if s.get("name") == "parity")
    assert (parity.get("tests"), parity.get("failures"), parity.get("skipped")) == ("2", "0", "1")
    assert parity.find(".//skipped").get("message").endswith(NO_TP)


def test_a_failing_applicable_row_still_fails_next_to_not_applicable_ones(tmp_path, plugin, capsys):
    rc, md, results, _ = _report(tmp_path, plugin(name="wrong-logits", scale_logits=1.5))
    stdout = capsys.readouterr().out
    assert rc == 1, stdout
    assert "FAIL (1 failing item(s))" in stdout and "parity tiny-12b float64 tp1: logits max abs" in stdout
    assert "1 not applicable to wrong-logits" in md
    assert [r["status"] for r in results["rows"]] == ["FAIL", "n/a"]


def test_declaring_support_then_refusing_is_a_failure_not_na(tmp_path, plugin, capsys):
    rc, md, results, junit = _report(tmp_path, plugin(name="lying-plugin", refuse_in_run=True))
    stdout = capsys.readouterr().out
    assert rc == 1, stdout
    assert "1 not applicable" in md  # tp2, declared
    tp1 = next(r for r in results["rows"] if r["layout"] == "tp1")
    assert tp1["status"] == "FAIL" and tp1["not_applicable"] is None
    assert "unsupported after declaring support" in tp1["error"] and "refused at run time" in tp1["error"]
    parity = next(s for s in junit if s.get("name") == "parity")
    assert (parity.get("failures"), parity.get("skipped")) == ("1", "1")


def test_our_report_names_our_model(tmp_path, capsys):
    rc, md, results, _ = _report(tmp_path, "gemma4-mcore")
    assert "Implementation under test: gemma4-mcore (this repo's model)" in md
    assert "## Parity: gemma4-mcore vs HF" in md and results["settings"]["impl"] == "gemma4-mcore"
    assert "2 parity runs (2 applicable, 0 not applicable to gemma4-mcore)" in md
    assert "implementation under test: gemma4-mcore" in capsys.readouterr().out

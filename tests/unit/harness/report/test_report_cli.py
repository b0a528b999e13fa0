"""``gemma4-harness report``: a reduced report (one preset, one dtype) renders, reads right and fails loudly.

What each test catches: a report that passes while parity fails (planted RoPE bug); an HTML page that is not
self-contained; a layout registry whose extra rows are not run or not compared; an erroring layout that
crashes the report instead of failing its row; JUnit that CI cannot parse.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import gemma4.model.rope as rope
import harness.report.layouts as layouts
from harness.cli import main
from harness.goldens.record import record_goldens

CASE = "forward/tiny-12b/float64"


@pytest.fixture(scope="module")
def goldens(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("report-goldens") / "goldens"
    record_goldens(directory, [CASE], command="pytest fixture")
    return directory


def report(tmp_path: Path, *extra: str, layouts: tuple[str, ...] = ("tp1",)) -> tuple[int, Path, str]:
    out = tmp_path / "report"
    rc = main(
        ["report", "--out", str(out), "--junit", str(tmp_path / "junit.xml"), "--preset", "tiny-12b"]
        + ["--dtype", "float64", *[a for name in layouts for a in ("--layout", name)], *extra]
    )
    return rc, out, (out / "summary.md").read_text() if (out / "summary.md").exists() else ""


def test_reduced_report_passes_and_is_self_contained(tmp_path, goldens, capsys):
    rc, out, md = report(tmp_path, "--goldens-dir", str(goldens), "--goldens-only", CASE)
    stdout, stderr = capsys.readouterr()
    assert rc == 0 and "PASS" in stdout, stdout
    assert "it/s" not in stderr and "%|" not in stderr  # no progress bar when stderr is not a terminal
    assert (
        "Result: **PASS**: 1 parity runs (1 applicable, 0 not applicable to gemma4-mcore), 0 layout comparisons, "
        "1 golden cases checked." in md
    )
    assert re.search(
        r"\| tiny-12b \| float64 \| tp1 \| fp64-exact-cross-framework \| \d\.\d\de-1\d \(≤ 1e-09\) \|", md
    )
    assert "No parallel layouts available yet (only tp1)." in md
    assert f"| {CASE} | ok |" in md
    page = (out / "report.html").read_text()
    assert "<table>" in page and "No parallel layouts available yet" in page
    sources = re.findall(r"src='([^']*)'", page) + re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(base64.b64decode(s.split(",", 1)[1])[:4] == b"\x89PNG" for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    for name in ("per_layer", "per_position", "equivalence", "golden_drift"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{name}.png)" in md
    suites = {s.get("name"): s for s in ET.parse(tmp_path / "junit.xml").getroot()}
    assert suites["parity"].get("tests") == "1" and suites["parity"].get("failures") == "0"
    assert suites["goldens"].get("tests") == "1" and suites["goldens"].get("failures") == "0"


def test_planted_bug_fails_the_report_and_is_named(tmp_path, goldens, capsys, monkeypatch):
    def rotate_half_gptj(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    monkeypatch.setattr(rope, "rotate_half", rotate_half_gptj)
    rc, out, md = report(tmp_path, "--goldens-dir", str(goldens), "--goldens-only", CASE)
    stdout = capsys.readouterr().out
    assert rc == 1 and "FAIL (2 failing item(s))" in stdout
    assert "Result: **FAIL**" in md and "## Failures" in md
    assert "| layer 0 (sliding_attention) attention | FAIL |" in md
    assert f"| {CASE} | REGRESSION |" in md
    root = ET.parse(tmp_path / "junit.xml").getroot()
    failures = root.findall(".//failure")
    assert len(failures) == 2 and "logits max abs" in failures[0].get("message")


def test_layout_registry_rows_are_run_compared_and_errors_fail_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        layouts,
        "LAYOUTS",
        layouts.LAYOUTS
        + [
            {"name": "tp1-again", "kwargs": {}, "description": "the baseline again"},
            {"name": "broken", "kwargs": {"no_such_option": 1}, "description": "run_parity rejects it"},
        ],
    )
    rc, out, md = report(tmp_path, "--no-goldens", layouts=("tp1", "tp1-again", "broken"))
    stdout = capsys.readouterr().out
    assert rc == 1
    assert "| tiny-12b | float64 | tp1-again | tp1 | 0.00e+00 | 1e-09 | PASS |" in md
    assert re.search(
        r"\| tiny-12b \| float64 \| broken \| tp1 \| TypeError: .*no_such_option.* \| FAIL \|", md
    )
    assert "parity tiny-12b float64 broken: TypeError" in stdout
    assert (out / "plots" / "equivalence.png").stat().st_size > 0


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "r"), "--layout", "tp9"]) == 2
    assert "--layout 'tp9' is not registered; layouts: tp1" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "r"), "--preset", "huge"]) == 2
    assert "--preset 'huge' is unknown" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "r"), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

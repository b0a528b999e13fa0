"""The ``gemma4-harness e2e-mini`` contract: exit 0 + JSON with the measured values, exit 1 naming the
failed gate, exit 2 (one line) for bad flags."""

from __future__ import annotations

import json

import pytest

import harness.e2e.run as e2e_run
import harness.e2e.trainer as e2e_trainer
from harness.cli import main


def test_pass_writes_json_with_the_measured_values(tmp_path, capsys):
    out = tmp_path / "r" / "e2e.json"
    assert main(["e2e-mini", "--steps", "1", "--group-size", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pass"] is True and result["failures"] == []
    assert result["max_logprob_gap"] <= result["tolerance"]["logprob_gap"] == 1e-9
    assert result["step0_kl"] <= 1e-12
    assert [s["iteration"] for s in result["steps"]] == [0, 1]
    assert result["config"]["vocab_size"] == 576 and result["config"]["group_size"] == 4
    assert list(tmp_path.joinpath("r").iterdir()) == [out]  # no temp file left behind
    text = capsys.readouterr().out
    assert "max log-prob gap" in text and text.rstrip().endswith("PASS")


def test_failed_gate_exits_1_and_is_named(monkeypatch, capsys):
    real = e2e_run.sync_weights
    monkeypatch.setattr(
        e2e_run, "sync_weights", lambda m, e, a, b, index: real(m, e, a, b, index) if index == 0 else None
    )
    assert main(["e2e-mini", "--steps", "1", "--group-size", "4"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "iteration 1: train/rollout log-prob gap" in text


def test_failed_run_json_is_strict(monkeypatch, tmp_path):
    """A shifted mask makes the gap infinite (a masked token the engine never generated): still valid JSON."""
    monkeypatch.setattr(e2e_trainer, "logit_mask_from_loss_mask", lambda m: m[:, :-1].bool())
    out = tmp_path / "e2e.json"
    assert main(["e2e-mini", "--steps", "1", "--group-size", "2", "--json", str(out)]) == 1

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    result = json.loads(out.read_text(), parse_constant=no_constants)
    assert result["pass"] is False and result["max_logprob_gap"] == "inf"
    assert any("loss mask does not cover exactly the response tokens" in f for f in result["failures"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--preset", "tiny-99b"], "unknown preset 'tiny-99b'"),
        (["--tp", "3"], "--tp 3 does not divide"),
        (["--ep", "2"], "--ep 2: the config has no experts"),
        (
            ["--preset", "tiny-26b-a4b", "--ep", "2", "--prompts", "1", "--group-size", "2"],
            "--ep 2: expert-parallel",
        ),
        (["--group-size", "1"], "--group-size must be >= 2"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    assert main(["e2e-mini", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1

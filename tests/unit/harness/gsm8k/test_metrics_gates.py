"""slime's metric lines -> JSON, and the gates on log fixtures written in slime's format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.gsm8k.gates import RunOutcome, evaluate, passed
from harness.gsm8k.metrics import parse_line, parse_lines
from harness.tolerances import GSM8K_GATES

FIXTURES = Path(__file__).parent / "fixtures"


def _parse(name: str):
    return parse_lines((FIXTURES / name).read_text().splitlines())


def _gates(name: str, variant: str = "31b", outcome: RunOutcome | None = None, strict: bool = False):
    outcome = outcome or RunOutcome(0, "exited")
    return {g.name: g for g in evaluate(_parse(name), outcome, GSM8K_GATES, variant, 3, strict)}


def test_parser_reads_slimes_lines_behind_prefixes():
    line = (
        "(MegatronTrainRayActor pid=7) [2026-11-27 10:10:03] model.py:512 - step 4: {'train/loss': 0.5, "
        "'train/grad_norm': np.float64(0.25), 'x': tensor(1.5, device='cuda:0'), 'y': nan, 'z': -inf, "
        "\"w\": 1e-06, 'n': 3, 'bad': None, 'lst': [1, 2]}"
    )
    kind, index, m, problems = parse_line(line)
    assert (kind, index, problems) == ("step", 4, [])
    assert m["train/loss"] == 0.5 and m["train/grad_norm"] == 0.25 and m["x"] == 1.5 and m["w"] == 1e-06
    assert math.isnan(m["y"]) and m["z"] == -math.inf and m["n"] == 3.0
    assert m["bad"] == "None" and m["lst"] == "[1, 2]"  # kept as text: the finite gate rejects them
    assert parse_line("rollout 12: {'rollout/raw_reward': 0.5}")[:3] == (
        "rollout",
        12,
        {"rollout/raw_reward": 0.5},
    )
    assert parse_line("the first step 3: was slow") is None
    assert parse_line("prestep 1: {'a': 1}") is None  # the tag must be a word of its own
    assert parse_line("eval 0: {'eval/gsm8k': 0.9")[3] == ["eval 0: unterminated metric dict"]


def test_parser_json_is_strict_json_and_merges_records():
    metrics = parse_lines(["step 0: {'a': 1.0}", "step 0: {'b': nan}", "perf 0: {'perf/t': 2.0}"])
    assert metrics.series["step"][0] == {"a": 1.0, "b": metrics.series["step"][0]["b"]}
    text = json.dumps(metrics.to_json(), allow_nan=False)  # NaN written as "nan", never as a bare NaN token
    assert json.loads(text)["series"]["step"]["0"]["b"] == "nan"
    assert metrics.lines == 3


def test_passing_fixture_passes_every_gate():
    gates = _gates("passing.log")
    assert all(g.passed for g in gates.values()), {n: g.message for n, g in gates.items()}
    assert gates["logprob_abs_diff"].value == pytest.approx(0.00833)
    assert gates["raw_reward"].value == pytest.approx(0.8125)
    assert passed(list(gates.values()))


@pytest.mark.parametrize(
    ("fixture", "gate", "words"),
    [
        ("nan.log", "finite", "step 1: train/loss = nan"),
        ("reward_collapse.log", "raw_reward", "0.0 at rollout 2 < floor 0.5"),
        ("logprob_drift.log", "logprob_abs_diff", "0.0733 at step 2 > 0.03125"),
        ("ppo_kl_step0.log", "ppo_kl_step0", "0.0021, not < 1e-08"),
        ("hang.log", "ran", "logged 1 steps and 1 rollouts"),
    ],
)
def test_each_bad_fixture_fails_its_gate(fixture, gate, words):
    gates = _gates(fixture)
    assert gates[gate].passed is False and words in gates[gate].message, gates[gate].message
    others = [n for n, g in gates.items() if g.passed is False and n != gate]
    assert others == [], others  # the bad run is caught by the gate meant for it, and only by it
    assert not passed(list(gates.values()))


def test_a_hang_is_a_failed_process_and_a_short_run():
    gates = _gates("hang.log", outcome=RunOutcome(None, "hang", 930.0, "no output for 900 s"))
    assert gates["process"].passed is False and "hang" in gates["process"].message
    assert gates["ran"].passed is False


def test_never_pass_without_running():
    gates = evaluate(parse_lines([]), RunOutcome(0, "exited"), GSM8K_GATES, "31b", 3)
    failed = {g.name for g in gates if g.passed is False}
    assert {"ran", "ppo_kl_step0", "logprob_abs_diff", "raw_reward"} <= failed
    assert not passed(gates)
    assert not passed(evaluate(_parse("passing.log"), RunOutcome(1, "exited"), GSM8K_GATES, "31b", 3))
    assert not passed(evaluate(_parse("passing.log"), RunOutcome(0, "exited"), GSM8K_GATES, "31b", 4))


def test_tiny_reward_is_reported_not_gated():
    gates = _gates("reward_collapse.log", variant="tiny")
    assert gates["raw_reward"].passed is None and "reported" in gates["raw_reward"].message
    assert passed(list(gates.values()))


def test_localhost_listeners_are_reported_or_gated():
    outcome = RunOutcome(0, "exited", localhost_violations=["sglang[12] 0.0.0.0:30000"])
    assert _gates("passing.log", outcome=outcome)["localhost"].passed is None
    assert _gates("passing.log", outcome=outcome, strict=True)["localhost"].passed is False


@pytest.mark.parametrize(
    ("fixture", "code", "exit_code"),
    [("passing.log", 0, 0), ("passing.log", 1, 1), ("nan.log", 0, 1), ("logprob_drift.log", 0, 1)],
)
def test_cli_parse_log(fixture, code, exit_code, tmp_path, capsys):
    report = tmp_path / "report.json"
    argv = [
        "--variant",
        "31b",
        "--parse-log",
        str(FIXTURES / fixture),
        "--exit-code",
        str(code),
        "--json",
        str(report),
    ]
    assert cli_main(["e2e-gsm8k", *argv]) == exit_code
    data = json.loads(report.read_text())
    assert data["pass"] is (exit_code == 0) and data["variant"] == "31b"
    assert "step 2:" in capsys.readouterr().out

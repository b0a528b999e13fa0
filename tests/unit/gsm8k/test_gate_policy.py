"""The gates golden: the committed file verifies; a missing, edited or corrupt one fails; record is explicit."""

from __future__ import annotations

import json

import pytest

from harness.gsm8k import golden
from harness.gsm8k.golden import GATES_FILE, GoldenError, load_bounds, payload_sha256, record


def test_committed_golden_is_valid_and_tighter_than_slime():
    bounds = load_bounds()
    assert bounds.ppo_kl_step0_max_abs == 1e-8
    assert 0 < bounds.logprob_abs_diff_max <= golden.SLIME_DEFAULT_LOGPROB_ALARM / 3
    data = json.loads(GATES_FILE.read_text())
    entry = data["gates"]["train_rollout_logprob_abs_diff_max"]
    assert entry["why"] and entry["status"] in ("provisional", "measured")
    assert data["provenance"]["command"].startswith("python -m harness.gsm8k.golden record")
    assert set(data["gates"]["raw_reward_min"]["value"]) == {"31b", "26b-a4b", "12b", "tiny"}


def test_missing_edited_corrupt_or_unknown_schema_fails(tmp_path):
    path = tmp_path / "gates.json"
    with pytest.raises(GoldenError, match="missing"):
        load_bounds(path)
    path.write_text("{not json")
    with pytest.raises(GoldenError, match="corrupt"):
        load_bounds(path)
    data = json.loads(GATES_FILE.read_text())
    data["gates"]["train_rollout_logprob_abs_diff_max"]["value"] = 0.09  # loosened by hand
    path.write_text(json.dumps(data))
    with pytest.raises(GoldenError, match="sha256 mismatch"):
        load_bounds(path)
    data["schema_version"] = 2
    data["sha256"] = payload_sha256(data)
    path.write_text(json.dumps(data))
    with pytest.raises(GoldenError, match="schema_version"):
        load_bounds(path)
    del data["gates"]["raw_reward_min"]
    data["schema_version"] = 1
    data["sha256"] = payload_sha256(data)
    path.write_text(json.dumps(data))
    with pytest.raises(GoldenError, match="lacks a field"):
        load_bounds(path)


def test_record_is_atomic_and_refuses_bounds_looser_than_slime(tmp_path):
    path = tmp_path / "g" / "gates.json"
    record(path, 0.02, "because", None, "test")
    assert load_bounds(path).logprob_abs_diff_max == 0.02
    assert [p.name for p in path.parent.iterdir()] == ["gates.json"]  # no temp file left behind
    with pytest.raises(GoldenError, match="must be in"):
        record(path, 0.1, "too loose", None, "test")
    assert load_bounds(path).logprob_abs_diff_max == 0.02


def test_record_from_a_measured_report(tmp_path):
    report = tmp_path / "report.json"
    steps = {
        str(i): {"train/train_rollout_logprob_abs_diff": v} for i, v in enumerate([0.006, 0.0081, 0.007])
    }
    report.write_text(json.dumps({"variant": "12b", "metrics": {"series": {"step": steps}}}))
    out = tmp_path / "gates.json"
    assert golden.main(["record", "--path", str(out), "--from-report", str(report)]) == 0
    data = json.loads(out.read_text())
    entry = data["gates"]["train_rollout_logprob_abs_diff_max"]
    assert entry["value"] == 0.016 and entry["status"] == "measured" and entry["measured"]["max"] == 0.0081
    assert golden.main(["check", "--path", str(out)]) == 0

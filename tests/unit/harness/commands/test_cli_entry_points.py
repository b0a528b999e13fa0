"""Flags a user passes that no other test ran through the command line (issue 17, "coverage of what users
call"; ``tests/unit/test_entry_points.py`` fails when a flag has no test).

Each test names the bug it catches: a flag parsed but never reaching the run.
"""

from __future__ import annotations

import json
import sys

import pytest

from harness.cli import main
from harness.gsm8k.command import REPO


@pytest.mark.xdist_group("multi-process")
def test_parity_tp_cp_sequence_parallel_packed_reach_the_run(tmp_path, capsys):
    """``tox -e parity``'s layout line through the CLI: ``--packed``/``--cp``/``--sequence-parallel`` dropped
    (parsed but not passed to the layout) would run the plain TP-1 layout and still pass."""
    out = tmp_path / "r.json"
    argv = ["parity", "--preset", "tiny-31b", "--dtype", "float64", "--tp", "2", "--cp", "2"]
    argv += ["--packed", "8,16", "--sequence-parallel", "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["pass"] is True
    assert r["layout"]["tp"] == 2 and r["layout"]["cp"] == 2
    assert r["layout"]["sequence_parallel"] is True and r["layout"]["packed"] == [8, 16]
    assert "PASS" in capsys.readouterr().out


@pytest.mark.xdist_group("multi-process")
def test_parity_expert_parallel_reaches_the_run(tmp_path):
    """``--ep 2`` dropped would run EP 1 (the layout name carries ``ep2`` only when two ranks ran)."""
    out = tmp_path / "r.json"
    assert (
        main(["parity", "--preset", "tiny-26b-a4b", "--dtype", "float64", "--ep", "2", "--json", str(out)])
        == 0
    )
    r = json.loads(out.read_text())
    assert r["pass"] is True and "ep2" in r["layout"]["name"]


@pytest.mark.parametrize("flag, shown", [("--progress", True), ("--no-progress", False)])
def test_goldens_check_progress_flag(capsys, flag, shown):
    """``--progress`` forces the bar even without a terminal; ``--no-progress`` silences it (the flag
    ignored would leave the default: no bar under pytest)."""
    case = "rope/tiny-12b/float32"  # needs no reference data (chat cases need the released templates)
    assert main(["goldens", "check", "--only", case, flag]) == 0
    err = capsys.readouterr().err
    assert ("checking goldens" in err) is shown


def _dry_run(capsys, *extra: str) -> str:
    paths = ["--hf-checkpoint", "/models/gemma4", "--dataset", "/data/gsm8k/train.jsonl"]
    paths += ["--slime-dir", "/opt/slime", "--workdir", "/runs/e2e"]
    assert main(["e2e-gsm8k", "--variant", "tiny", *paths, *extra, "--dry-run"]) == 0
    return capsys.readouterr().out.replace(sys.executable, "<python>").replace(str(REPO), "<repo>")


def test_e2e_gsm8k_flags_reach_the_plan(capsys):
    """``--megatron-dir`` (PYTHONPATH), ``--input-key``/``--label-key`` (slime's dataset keys) and
    ``--stall-timeout`` reach the printed plan; a flag parsed but dropped leaves the default there."""
    default = _dry_run(capsys)
    text = _dry_run(
        capsys,
        "--megatron-dir",
        "/opt/megatron-lm-x",
        "--input-key",
        "question_x",
        "--label-key",
        "answer_x",
        "--stall-timeout",
        "4321",
    )
    for value in ("/opt/megatron-lm-x", "question_x", "answer_x", "stall (no output) 4321 s"):
        assert value in text and value not in default, value


def test_e2e_mini_learning_rate_and_bucket_size_reach_the_run(tmp_path):
    """``--lr`` sets Adam's step (its first step moves a weight by about ``lr``); ``--bucket-kib`` sets the
    weight-sync bucket (smaller buckets, more of them). Either flag dropped leaves the default."""
    runs = {}
    for name, extra in (("default", []), ("set", ["--lr", "0.002", "--bucket-kib", "1"])):
        out = tmp_path / f"{name}.json"
        assert main(["e2e-mini", "--steps", "1", "--group-size", "4", *extra, "--json", str(out)]) == 0
        runs[name] = json.loads(out.read_text())
    default, chosen = runs["default"], runs["set"]
    assert chosen["config"]["lr"] == 0.002 and chosen["config"]["bucket_bytes"] == 1024
    assert 0.5 * 0.002 <= chosen["steps"][0]["weights_max_change"] <= 1.01 * 0.002
    assert default["steps"][0]["weights_max_change"] <= 1.01 * default["config"]["lr"] < 0.001
    assert chosen["steps"][0]["sync"]["buckets"] > default["steps"][0]["sync"]["buckets"]


@pytest.mark.parametrize("flag, shown", [("--progress", True), ("--no-progress", False)])
def test_goldens_record_progress_flag(tmp_path, capsys, flag, shown):
    """``goldens record``'s ``--progress`` / ``--no-progress`` (into a copy of the store; the repository's
    goldens are never written by tests)."""
    import shutil

    from harness.reference_data import REPO_ROOT

    goldens = tmp_path / "goldens"
    shutil.copytree(REPO_ROOT / "goldens", goldens)
    case = "rope/tiny-12b/float32"
    assert main(["goldens", "record", "--update", "--only", case, "--goldens-dir", str(goldens), flag]) == 0
    assert ("recording goldens" in capsys.readouterr().err) is shown


@pytest.mark.parametrize("flag, shown", [("--progress", True), ("--no-progress", False)])
def test_report_progress_flag(tmp_path, capsys, flag, shown):
    """``report``'s ``--progress`` / ``--no-progress`` on the smallest grid (one preset, dtype and layout)."""
    argv = ["report", "--out", str(tmp_path / "r"), "--preset", "tiny-12b", "--dtype", "float32"]
    argv += ["--layout", "tp1", "--goldens-only", "rope/tiny-12b/float32", flag]
    assert main(argv) == 0
    assert ("parity runs" in capsys.readouterr().err) is shown


def test_convert_mcore_to_hf_for_sglang_and_relayout_json(tmp_path, capsys):
    """``mcore-to-hf --for sglang`` through the CLI writes the ``gemma4`` wrapper SGLang starts from (the flag
    dropped would write ``gemma4_text``); ``relayout --json`` writes its report (dropped: no file)."""
    from safetensors import safe_open

    from harness.presets import preset_config_dict
    from harness.testing.conversion import save_hf_checkpoint

    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-31b"), seed=2)
    ours = tmp_path / "ours"
    assert main(["convert", "hf-to-mcore", "--hf-checkpoint", str(hf), "--out", str(ours)]) == 0
    out = tmp_path / "sglang"
    assert main(["convert", "mcore-to-hf", "--mcore", str(ours), "--out", str(out), "--for", "sglang"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4" and config["architectures"] == ["Gemma4ForConditionalGeneration"]
    names = set()
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    assert names and all(n.startswith("model.language_model.") for n in names)

    report = tmp_path / "relayout.json"
    argv = ["convert", "relayout", "--mcore", str(ours), "--out", str(tmp_path / "bridge")]
    assert main([*argv, "--to", "megatron-bridge", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data and json.dumps(data).count("megatron-bridge") >= 1
    capsys.readouterr()

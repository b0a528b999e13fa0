"""``--dry-run``: the full command and configuration per variant (snapshots), and nothing is started.

Snapshots live in ``snapshots/<variant>.txt``; after an intended change, review the diff and rewrite them
with ``GEMMA4_UPDATE_SNAPSHOTS=1 pytest tests/unit/harness/gsm8k/test_dry_run.py`` (the only way they are written).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.gsm8k.command import REPO, Options, build_plan, resolved_env
from harness.gsm8k.model_args import read_model_args, script_path
from harness.gsm8k.variants import VARIANTS

SNAPSHOTS = Path(__file__).parent / "snapshots"
PATHS = [
    "--checkpoint", "/models/gemma4",
    "--dataset", "/data/gsm8k/train.jsonl",
    "--slime-dir", "/opt/slime",
    "--workdir", "/runs/e2e",
]  # fmt: skip


def _dry_run(variant: str, capsys, extra=()) -> str:
    assert cli_main(["e2e-gsm8k", "--variant", variant, *PATHS, *extra, "--dry-run"]) == 0
    out = capsys.readouterr().out
    return out.replace(sys.executable, "<python>").replace(str(REPO), "<repo>")


@pytest.fixture
def nothing_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"--dry-run started a process: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dry_run_snapshot(variant, capsys, nothing_runs):
    """Catches any unreviewed change of the command: a flag dropped, a value changed, a path moved."""
    text = _dry_run(variant, capsys)
    path = SNAPSHOTS / f"{variant}.txt"
    if os.environ.get("GEMMA4_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    assert path.exists(), f"snapshot {path} is missing (GEMMA4_UPDATE_SNAPSHOTS=1 writes it)"
    assert text == path.read_text()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_train_command_carries_the_run_we_promise(variant):
    plan = build_plan(
        Options(
            variant, checkpoint=Path("/c"), dataset=Path("/d.jsonl"), slime_dir=Path("/s"), workdir=Path("/w")
        )
    )
    assert [s.name for s in plan.steps] == ["prepare", "train"] and plan.unset == []
    argv = plan.steps[-1].argv
    v = VARIANTS[variant]
    model_args = read_model_args(script_path(variant))
    start = argv.index("/s/train.py") + 1
    assert argv[start : start + len(model_args)] == model_args  # the script's flags, verbatim, first

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert value("--rm-type") == "math" and "--ci-test" in argv and value("--num-rollout") == "3"
    assert int(value("--rollout-batch-size")) * int(value("--n-samples-per-prompt")) == int(
        value("--global-batch-size")
    )
    assert value("--actor-num-gpus-per-node") == str(v.gpus) and value("--tensor-model-parallel-size") == str(
        v.tp
    )
    assert (
        value("--expert-model-parallel-size") == str(v.ep)
        and ("--sequence-parallel" in argv) == v.sequence_parallel
    )
    assert value("--custom-model-provider-path") == "gemma4.slime.model_provider.model_provider"
    assert value("--ref-load") == value("--load") == "/w/ref" and value("--hf-checkpoint") == "/c"
    assert v.gpus % v.tp == 0 and v.gpus % v.ep == 0 and v.gpus % v.rollout_gpus_per_engine == 0
    env = plan.steps[-1].env
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["HF_HUB_OFFLINE"] == "1"
    assert not any("0.0.0.0" in w for w in argv + list(env.values()))
    driver = argv[: argv.index("--")]
    assert driver[1:3] == ["-m", "harness.gsm8k.driver"] and value("--num-gpus") == str(v.gpus)
    full_env = resolved_env(plan.steps[-1], {"PYTHONPATH": "/x"})
    assert full_env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/s", "/x"]


def test_existing_megatron_checkpoint_skips_the_conversion_and_eval_is_optional(capsys, nothing_runs):
    text = _dry_run(
        "12b", capsys, ["--mcore-checkpoint", "/ckpt/ref", "--eval-dataset", "/data/gsm8k/test.jsonl"]
    )
    assert "step 1/1: train" in text and "harness.gsm8k.prepare" not in text
    assert "--ref-load /ckpt/ref" in text and "--eval-prompt-data gsm8k /data/gsm8k/test.jsonl" in text


def test_dry_run_without_paths_names_what_is_unset(capsys, nothing_runs, monkeypatch):
    monkeypatch.setattr("harness.gsm8k.command.default_slime_dir", lambda: None)
    assert cli_main(["e2e-gsm8k", "--variant", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "unset        --hf-checkpoint, --dataset, --slime-dir" in out and "<--slime-dir>/train.py" in out


def test_bad_arguments_exit_2(capsys):
    assert cli_main(["e2e-gsm8k", "--dry-run"]) == 2
    assert "--variant is required" in capsys.readouterr().err
    assert cli_main(["e2e-gsm8k", "--variant", "tiny", "--num-rollout", "0", "--dry-run"]) == 2


def test_step_shell_line_is_copy_pasteable():
    plan = build_plan(
        Options(
            "tiny",
            checkpoint=Path("/c d"),
            dataset=Path("/d.jsonl"),
            slime_dir=Path("/s"),
            workdir=Path("/w"),
        )
    )
    line = plan.steps[0].shell()
    assert "'/c d'" in line and shlex.split(line)[0] == "cd"


def test_cli_subcommand_is_registered(capsys):
    from harness.cli import main

    assert main(["e2e-gsm8k", "--variant", "tiny", *PATHS, "--dry-run"]) == 0
    assert "e2e-gsm8k --variant tiny (dry run" in capsys.readouterr().out

"""Hardware stages never pass by accident: without a GPU they fail with a message, unless opted out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import stages

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", sorted(stages.STAGES))
def test_stage_fails_without_gpu(stage, monkeypatch, capsys):
    monkeypatch.setattr(stages, "gpu_summary", lambda: None)
    monkeypatch.delenv("GEMMA4_ALLOW_NO_GPU", raising=False)
    assert stages.main([stage]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("stage", sorted(stages.STAGES))
def test_explicit_opt_out_is_a_loud_skip(stage, monkeypatch, capsys):
    monkeypatch.setattr(stages, "gpu_summary", lambda: None)
    monkeypatch.setenv("GEMMA4_ALLOW_NO_GPU", "1")
    assert stages.main([stage]) == 0
    assert "SKIPPED" in capsys.readouterr().out


@pytest.mark.parametrize("stage", sorted(stages.STAGES))
def test_unbuilt_stage_fails_even_with_gpu(stage, monkeypatch, capsys):
    monkeypatch.setattr(stages, "gpu_summary", lambda: "1 x FakeGPU")
    assert stages.main([stage]) == 1
    assert "not built yet" in capsys.readouterr().err


def test_real_machine_subprocess():
    """On this CPU machine the stage exits non-zero (run as tox runs it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "harness.stages", "gpu-parity"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1
    assert "gpu-parity: FAILED" in proc.stderr


def test_unknown_stage():
    assert stages.main(["nope"]) == 2

"""Hardware stages never pass by accident: without a GPU they fail with a message, unless opted out; with one,
``gpu-parity`` installs a CUDA stack and runs ``tests/gpu``, and ``e2e-gsm8k`` goes through its preflight.

Also here: the CPU-testable part of the GPU stage, its device-parity runner (``tests/gpu/device_parity.py``)
run on CPU, where HF and our model agree bitwise, with planted bugs that its gates must catch.
"""

from __future__ import annotations

import configparser
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import stages

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("stage", sorted(stages.STAGES))
def test_stage_fails_without_gpu(stage, monkeypatch, capsys):
    monkeypatch.setattr(stages, "gpu_summary", lambda: None)
    monkeypatch.delenv("GEMMA4_ALLOW_NO_GPU", raising=False)
    assert stages.main([stage]) == 1
    assert stages.main([stage, "--preflight"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("stage", sorted(stages.STAGES))
def test_explicit_opt_out_is_a_loud_skip(stage, monkeypatch, capsys):
    monkeypatch.setattr(stages, "gpu_summary", lambda: None)
    monkeypatch.setenv("GEMMA4_ALLOW_NO_GPU", "1")
    monkeypatch.setattr(stages, "_run", lambda cmd, **kw: pytest.fail(f"ran {cmd} on a machine without GPU"))
    assert stages.main([stage]) == 0
    assert "SKIPPED" in capsys.readouterr().out


@pytest.fixture
def fake_gpu_machine(monkeypatch):
    """A GPU is visible; commands are recorded instead of run; torch's CUDA status follows ``status``."""
    monkeypatch.setattr(stages, "gpu_summary", lambda: "1 x FakeGPU")
    calls: list[list[str]] = []
    state = {
        "codes": {},
        "status": [(False, "torch 2.13.0+cpu is a CPU-only build"), (True, "torch 2.13.0, CUDA 12.8")],
    }

    def run(cmd, **kwargs):
        calls.append(list(cmd))
        return state["codes"].get(cmd[2], 0)

    def status(python=sys.executable):
        return state["status"].pop(0) if len(state["status"]) > 1 else state["status"][0]

    monkeypatch.setattr(stages, "_run", run)
    monkeypatch.setattr(stages, "torch_cuda_status", status)
    return calls, state


def test_preflight_with_a_gpu_passes(fake_gpu_machine, capsys):
    calls, _ = fake_gpu_machine
    assert stages.main(["gpu-parity", "--preflight"]) == 0
    assert "GPU found: 1 x FakeGPU" in capsys.readouterr().out and calls == []


def test_gpu_parity_installs_a_cuda_stack_then_runs_the_gpu_tests(fake_gpu_machine, monkeypatch):
    calls, _ = fake_gpu_machine
    monkeypatch.delenv("GEMMA4_GPU_TORCH", raising=False)
    assert stages.main(["gpu-parity", "-k", "bf16"]) == 0
    pip_torch, pip_rest, pytest_cmd = calls
    assert pip_torch[1:] == ["-m", "pip", "install", "torch==2.13.0"]
    assert pip_rest[4:] == ["megatron-core==0.16.1", "transformers==5.24.0", "-e", f"{REPO}[test]"]
    assert not any("cpu" in word for cmd in calls for word in cmd)  # never the CPU wheel or index
    assert " ".join(pytest_cmd[1:]) == "-m pytest -p no:cacheprovider -m gpu -ra tests/gpu -k bf16"


def test_gpu_parity_keeps_an_installed_cuda_torch(fake_gpu_machine):
    calls, state = fake_gpu_machine
    state["status"] = [(True, "torch 2.11.0, CUDA 13.0")]
    assert stages.main(["gpu-parity"]) == 0
    assert [c[4] for c in calls[:1]] == ["megatron-core==0.16.1"] and len(calls) == 2


def test_gpu_parity_fails_when_torch_cannot_use_the_gpu(fake_gpu_machine, capsys):
    calls, state = fake_gpu_machine
    state["status"] = [(False, "torch 2.13.0+cpu is a CPU-only build")]
    assert stages.main(["gpu-parity"]) == 1
    assert "CPU-only build" in capsys.readouterr().err
    assert not any(c[2] == "pytest" for c in calls)


def test_gpu_parity_without_install_and_no_tests_collected(fake_gpu_machine, capsys):
    calls, state = fake_gpu_machine
    state["codes"]["pytest"] = 5
    assert stages.main(["gpu-parity", "--no-install"]) == 1
    assert [c[2] for c in calls] == ["pytest"] and "collected no GPU test" in capsys.readouterr().err


def test_e2e_with_a_gpu_goes_through_its_preflight(fake_gpu_machine, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("harness.gsm8k.preflight.gpu_inventory", lambda: ([("FakeGPU", 80.0)], ""))
    monkeypatch.setattr("harness.gsm8k.command.default_slime_dir", lambda: None)
    assert stages.main(["e2e-gsm8k", "--variant", "tiny", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "preflight FAILED" in err and "slime" in err and "checkpoint: not given" in err


def test_e2e_dry_run_needs_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(stages, "gpu_summary", lambda: None)
    monkeypatch.delenv("GEMMA4_ALLOW_NO_GPU", raising=False)
    assert stages.main(["e2e-gsm8k", "--preflight", "--variant", "tiny", "--dry-run"]) == 0
    assert stages.main(["e2e-gsm8k", "--variant", "tiny", "--dry-run"]) == 0
    assert "dry run: nothing is started" in capsys.readouterr().out


def test_real_machine_subprocess():
    """On this CPU machine both stages exit non-zero, standard library only (run as tox runs it)."""
    for stage in stages.STAGES:
        proc = subprocess.run(
            [sys.executable, "-S", "-m", "harness.stages", stage, "--preflight"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 1, proc.stderr
        assert f"{stage}: FAILED" in proc.stderr


def test_unknown_stage():
    assert stages.main(["nope"]) == 2


def _tox() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "tox.ini")
    return parser


def test_tox_envs_fail_fast_and_pin_like_the_cpu_gate():
    tox = _tox()
    cpu_pins = tox["base"]["cpu_pins"].split()
    assert [p for p in cpu_pins if not p.startswith("torch")] == list(stages.GPU_PINS)
    gpu = tox["testenv:gpu-parity"]
    assert gpu["skip_install"].strip() == "true" and not gpu.get("deps", "").strip()
    assert gpu["commands_pre"].split() == ["python", "-m", "harness.stages", "gpu-parity", "--preflight"]
    assert "harness.stages gpu-parity" in gpu["commands"] and "cpu" not in gpu["commands"]
    e2e = tox["testenv:e2e-gsm8k"]
    assert e2e["commands_pre"].split()[:5] == ["python", "-m", "harness.stages", "e2e-gsm8k", "--preflight"]
    assert (
        "tests/unit" in tox["testenv:unit"]["commands"] and "tests/gpu" not in tox["testenv:unit"]["commands"]
    )


# ---- the device-parity runner of tests/gpu, on CPU -------------------------------------------------------


@pytest.fixture(scope="module")
def device_parity():
    path = REPO / "tests" / "gpu" / "device_parity.py"
    spec = importlib.util.spec_from_file_location("gemma4_device_parity_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_on_cpu_bf16_passes_with_noise_floor_bounds(device_parity):
    """CPU bf16 mirrors HF op for op (bitwise); the bounds come from HF's own distance to exact fp64."""
    from harness.parity import resolve_source

    r = device_parity.run_device_parity(resolve_source(preset="tiny-31b"), device="cpu", seq_len=24)
    assert r["pass"], r["failures"]
    assert r["metrics"]["logits_max_abs"] == 0.0 and r["bounds"]["name"].startswith("bf16-gpu-cross-kernel+")
    noise = r["reference_noise_vs_exact_fp64"]
    assert (
        r["bounds"]["logits_max_abs"] == max(2**-5, 2 * noise["logits_max_abs"])
        and noise["logits_max_abs"] > 0
    )
    assert r["attention_backends"] == dict.fromkeys(range(8), "dense")


@pytest.mark.parametrize(
    ("bug", "dtype", "where"),
    [
        ("softcap_missing", torch.bfloat16, "logits"),
        ("erf_gelu", torch.float32, "layer 0 (sliding_attention) mlp"),
    ],
)
def test_runner_catches_planted_bugs(device_parity, bug, dtype, where, monkeypatch):
    """The runner's gates go red (logits, log-probs, KL, argmax; first divergence located) for real bugs."""
    import gemma4.model.gpt_model as gpt_model
    import gemma4.model.transformer_config as transformer_config
    from harness.parity import resolve_source

    if bug == "softcap_missing":
        monkeypatch.setattr(gpt_model, "softcap", lambda logits, cap: logits)
    else:
        monkeypatch.setattr(transformer_config, "gelu_tanh", torch.nn.functional.gelu)
    r = device_parity.run_device_parity(
        resolve_source(preset="tiny-12b"), device="cpu", dtype=dtype, seq_len=24
    )
    assert not r["pass"] and r["first_divergence"] == where, (r["first_divergence"], r["failures"])
    assert any("log p" in f for f in r["failures"])

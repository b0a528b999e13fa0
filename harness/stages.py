"""Hardware stages (``tox -e gpu-parity``, ``tox -e e2e-gsm8k``): they never pass by accident.

``python -m harness.stages STAGE [--preflight] [--no-install] [ARGS...]``. This module needs only the
standard library at import time, so a stage fails in seconds on a machine without a GPU, before anything
multi-GB is installed. Without a usable GPU each stage exits 1 with a message saying so;
``GEMMA4_ALLOW_NO_GPU=1`` turns that into an explicit, loudly reported skip (exit 0).

* ``--preflight``: only the GPU check (tox's ``commands_pre``).
* ``gpu-parity``: installs what the GPU tests need into *this* interpreter unless ``--no-install``
  (a CUDA build of torch, never the CPU wheel; the project's megatron-core and transformers pins; this
  project with its test extra; ``$GEMMA4_GPU_EXTRA_PACKAGES``), checks that torch sees CUDA, then runs
  ``pytest -m gpu tests/gpu`` (ARGS go to pytest). Measured numbers land in ``$GEMMA4_GPU_REPORT``
  (default ``reports/gpu-parity.json``).
* ``e2e-gsm8k``: hands ARGS to :mod:`harness.commands.e2e_gsm8k` (preflight of GPUs, slime, sglang, ray, checkpoint
  and dataset, then the run). ``--dry-run`` needs no GPU: it only prints the plan.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

STAGES = {
    "gpu-parity": "bf16 parity of every preset on CUDA",
    "e2e-gsm8k": "GSM8K RL smoke run through slime",
}
REPO = Path(__file__).resolve().parents[1]
# The CPU gate's pins (tox.ini [base] cpu_pins) minus torch, whose CUDA build is chosen separately.
GPU_PINS = ("megatron-core==0.16.1", "transformers==5.24.0")
DEFAULT_GPU_TORCH = "torch==2.13.0"
DEFAULT_REPORT = REPO / "reports" / "gpu-parity.json"


def gpu_summary() -> str | None:
    """A one-line description of the visible CUDA GPUs, or None when there are none."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # torch missing or broken: fall back to the driver tool
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
            if out.returncode == 0 and "GPU" in out.stdout:
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def _run(cmd: list[str], **kwargs) -> int:
    """Run one command (inherits stdout/stderr); its exit code."""
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False, **kwargs).returncode


def torch_cuda_status(python: str = sys.executable) -> tuple[bool, str]:
    """(torch imports and sees CUDA, description) for ``python``, probed in a subprocess."""
    probe = "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot run {python} ({exc})"
    if out.returncode != 0:
        return False, "torch is not importable"
    version, cuda, available = (out.stdout.strip().split() + ["", "", ""])[:3]
    if cuda in ("None", ""):
        return False, f"torch {version} is a CPU-only build"
    if available != "True":
        return False, f"torch {version} (CUDA {cuda}) does not see a GPU"
    return True, f"torch {version}, CUDA {cuda}"


def install_gpu_requirements(python: str = sys.executable) -> int:
    """Install the GPU stage's packages into ``python``'s environment; 0 on success (see module docstring)."""
    ok, what = torch_cuda_status(python)
    pip = [python, "-m", "pip", "install"]
    if not ok:
        torch_spec = os.environ.get("GEMMA4_GPU_TORCH", DEFAULT_GPU_TORCH)
        print(f"gpu-parity: {what}; installing {torch_spec} (a CUDA build)", flush=True)
        if _run([*pip, torch_spec]) != 0:
            return 1
    extras = os.environ.get("GEMMA4_GPU_EXTRA_PACKAGES", "").split()
    if _run([*pip, *GPU_PINS, *extras, "-e", f"{REPO}[test]"]) != 0:
        return 1
    ok, what = torch_cuda_status(python)
    if not ok:
        print(
            f"gpu-parity: FAILED: after installing, {what}. Point GEMMA4_GPU_TORCH / PIP_INDEX_URL at a CUDA build "
            "of torch for this driver.",
            file=sys.stderr,
        )
        return 1
    print(f"gpu-parity: {what}", flush=True)
    return 0


def run_gpu_parity(pytest_args: list[str], install: bool) -> int:
    """Install (optionally), then ``pytest -m gpu tests/gpu``; pytest finding no test is a failure."""
    if install and install_gpu_requirements() != 0:
        return 1
    env = dict(os.environ)
    env.setdefault("GEMMA4_GPU_REPORT", str(DEFAULT_REPORT))
    code = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            "-ra",
            "tests/gpu",
            *pytest_args,
        ],
        cwd=REPO,
        env=env,
    )
    if code == 5:
        print("gpu-parity: FAILED: pytest collected no GPU test", file=sys.stderr)
        return 1
    return code


def main(argv: list[str] | None = None) -> int:
    """Run (or refuse) a hardware stage; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in STAGES:
        print(
            f"usage: python -m harness.stages {{{','.join(STAGES)}}} [--preflight] [ARGS...]", file=sys.stderr
        )
        return 2
    stage, rest = argv[0], argv[1:]
    preflight_only = "--preflight" in rest
    install = "--no-install" not in rest
    rest = [a for a in rest if a not in ("--preflight", "--no-install")]
    if stage == "e2e-gsm8k" and "--dry-run" in rest:  # prints the plan, starts nothing: no GPU needed
        if preflight_only:
            print(f"{stage}: --dry-run: no GPU needed")
            return 0
        from harness.cli import main as cli_main

        return cli_main(["e2e-gsm8k", *rest])
    gpu = gpu_summary()
    if gpu is None:
        msg = f"{stage}: FAILED: needs a CUDA GPU ({STAGES[stage]}); no GPU is visible on this machine."
        if os.environ.get("GEMMA4_ALLOW_NO_GPU") == "1":
            print(f"{stage}: SKIPPED by explicit opt-out GEMMA4_ALLOW_NO_GPU=1 (no GPU visible).")
            return 0
        print(msg + " Set GEMMA4_ALLOW_NO_GPU=1 to turn this into an explicit skip.", file=sys.stderr)
        return 1
    if preflight_only:
        print(f"{stage}: GPU found: {gpu}")
        return 0
    if stage == "gpu-parity":
        return run_gpu_parity(rest, install)
    from harness.cli import main as cli_main

    return cli_main(["e2e-gsm8k", *rest])  # the one parser of `gemma4-harness e2e-gsm8k`


if __name__ == "__main__":
    raise SystemExit(main())

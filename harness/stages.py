"""Hardware stages (``tox -e gpu-parity``, ``tox -e e2e-gsm8k``): they never pass by accident.

Standard library only, so the stage fails in seconds on a machine without a GPU instead of installing a
CUDA stack first. Without a usable GPU each stage exits 1 with a message saying so;
``GEMMA4_ALLOW_NO_GPU=1`` turns that into an explicit, loudly reported skip (exit 0). With a GPU, a stage
whose implementation has not landed yet also exits 1 and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

STAGES = {
    "gpu-parity": "bf16 parity of every preset on CUDA",
    "e2e-gsm8k": "GSM8K RL smoke run through slime",
}


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


def main(argv: list[str] | None = None) -> int:
    """Run (or refuse) a hardware stage; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m harness.stages {{{','.join(STAGES)}}}", file=sys.stderr)
        return 2
    stage = argv[0]
    gpu = gpu_summary()
    if gpu is None:
        msg = f"{stage}: FAILED: needs a CUDA GPU ({STAGES[stage]}); no GPU is visible on this machine."
        if os.environ.get("GEMMA4_ALLOW_NO_GPU") == "1":
            print(f"{stage}: SKIPPED by explicit opt-out GEMMA4_ALLOW_NO_GPU=1 (no GPU visible).")
            return 0
        print(msg + " Set GEMMA4_ALLOW_NO_GPU=1 to turn this into an explicit skip.", file=sys.stderr)
        return 1
    print(f"{stage}: FAILED: not built yet ({STAGES[stage]}); GPU found: {gpu}.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

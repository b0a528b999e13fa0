"""GPU tests (``tox -e gpu-parity``): they fail without CUDA, unless ``GEMMA4_ALLOW_NO_GPU=1`` turns that
into an explicit skip. ``tox -e unit`` runs ``tests/unit`` only and never collects this directory.

Every result is printed and collected into ``$GEMMA4_GPU_REPORT`` (default ``reports/gpu-parity.json``)
at the end of the session: the numbers for the closing note.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# pytest runs in importlib mode (pyproject): the GPU tests import their shared helpers (device_parity.py)
# from this directory, so it goes on sys.path (it holds no directory that could shadow a package).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
_RESULTS: list[dict] = []


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, broken driver: no CUDA
        return False


@pytest.fixture(autouse=True)
def _require_cuda():
    if not cuda_available():
        if os.environ.get("GEMMA4_ALLOW_NO_GPU") == "1":
            pytest.skip("no CUDA GPU: skipped by the explicit opt-out GEMMA4_ALLOW_NO_GPU=1")
        pytest.fail(
            "tests/gpu need a CUDA GPU and none is visible: run `tox -e gpu-parity` (or scripts/gpu-check.sh) "
            "on a GPU machine, or set GEMMA4_ALLOW_NO_GPU=1 to skip explicitly",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """No TF32: fp32 runs must be fp32 (HF and ours alike)."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def gpu_report():
    """``gpu_report(result)`` records one result dict (printed now, written at the end of the session)."""
    from device_parity import summary_line, write_report

    def add(result: dict) -> dict:
        _RESULTS.append(result)
        print("\n" + summary_line(result) if "metrics" in result else f"\n{result}")
        return result

    yield add
    if _RESULTS:
        write_report(
            _RESULTS, Path(os.environ.get("GEMMA4_GPU_REPORT", REPO / "reports" / "gpu-parity.json"))
        )

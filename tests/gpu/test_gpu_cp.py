"""Context parallelism 2 over two GPUs (NCCL, zig-zag chunks), when the machine has two."""

from __future__ import annotations

import pytest
import torch
from device_parity import run_cp_parity

from harness.parity import resolve_source

pytestmark = pytest.mark.gpu


def _require_two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(
            f"CP 2 needs two GPUs; this machine has {torch.cuda.device_count()}: CP 2 was NOT checked"
        )


@pytest.mark.parametrize("packed", [None, (32, 64, 32)])
@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b"])
def test_cp2(preset, packed, gpu_report):
    _require_two_gpus()
    result = gpu_report(
        run_cp_parity(resolve_source(preset=preset), cp=2, dtype=torch.bfloat16, packed=packed)
    )
    assert result["pass"], result["failures"]

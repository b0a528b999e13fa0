"""bf16 and fp32 parity of every preset on CUDA, our model built through the slime model provider."""

from __future__ import annotations

import pytest
import torch
from device_parity import run_device_parity

from harness.parity import resolve_source
from harness.presets import PRESETS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bf16_parity_every_preset(preset, gpu_report):
    """Bounds: harness.tolerances.gpu_bf16 / gpu_logprob_bound from HF's own noise in this run."""
    result = gpu_report(
        run_device_parity(resolve_source(preset=preset), device="cuda", dtype=torch.bfloat16, seq_len=64)
    )
    assert result["pass"], result["failures"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fp32_parity_every_preset(preset, gpu_report):
    """TF32 off: the CUDA kernels must agree to fp32 rounding (reordered FP32_STOCK, 5e-5 floor)."""
    result = gpu_report(
        run_device_parity(resolve_source(preset=preset), device="cuda", dtype=torch.float32, seq_len=64)
    )
    assert result["pass"], result["failures"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_documents(dtype, gpu_report):
    """One packed row (THD, cu_seqlens) against each document run alone by HF."""
    result = gpu_report(
        run_device_parity(
            resolve_source(preset="tiny-31b"),
            device="cuda",
            dtype=dtype,
            packed=(40, 24, 64),
            label="tiny-31b packed",
        )
    )
    assert result["pass"], result["failures"]

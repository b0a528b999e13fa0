"""``--transformer-impl transformer_engine``: the spec with Transformer Engine linears (where TE is installed)."""

from __future__ import annotations

import pytest
import torch
from device_parity import run_device_parity

from harness.parity import resolve_source

pytestmark = pytest.mark.gpu


def _require_te() -> None:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - absent or broken TE
        pytest.skip(f"Transformer Engine is not installed ({exc}): the TE spec variant was NOT checked")


def _te_build(hf_config, dtype, backend="auto"):
    from harness.testing.slime import provider_model

    return provider_model(
        hf_config, dtype, transformer_impl="transformer_engine", gemma4_attention_backend=backend
    )


@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_transformer_engine_linears(preset, dtype, gpu_report):
    _require_te()
    result = gpu_report(
        run_device_parity(
            resolve_source(preset=preset), device="cuda", dtype=dtype, build=_te_build, label=f"{preset} TE"
        )
    )
    assert result["pass"], result["failures"]
    assert {"TEColumnParallelLinear", "TERowParallelLinear"} <= set(result["linear_classes"])
    assert "KEqVColumnParallelLinear" in result["linear_classes"]  # K=V linear_qkv keeps its own class

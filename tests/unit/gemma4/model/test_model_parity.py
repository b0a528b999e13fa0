"""Whole-model parity with HF on presets and on hypothesis-drawn faithful dense configs.

fp64 against the exact-fp64 reference: logits and every captured activation (embedding, each layer's
attention, MLP and output, final norm) <= 1e-9, and the gradient of every parameter <= 1e-9 of its scale.
fp32 against stock HF: <= 5e-5. bf16: the distribution bounds of the policy.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4.config import hf_text_config_from_any, text_spec_from_hf
from harness.parity import ParitySource, resolve_source, run_parity
from harness.presets import PRESETS
from harness.strategies import dense_configs


def _source(config: dict) -> ParitySource:
    cfg = hf_text_config_from_any(config)
    return ParitySource("hypothesis", cfg, text_spec_from_hf(cfg))


def _explain(result: dict) -> str:
    return f"first divergence: {result['first_divergence']}; failures: {result['failures']}; config: {result['config']}"


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_presets(name, dtype):
    result = run_parity(resolve_source(preset=name), dtype, grads=dtype == torch.float64)
    assert result["pass"], _explain(result)
    if dtype == torch.float64:
        assert result["metrics"]["grads_max_scaled"] <= 1e-9
        assert len(result["grads"]["per_parameter"]) > 0


@given(
    config=dense_configs(), batch=st.integers(1, 2), seq_len=st.integers(2, 16), seed=st.integers(0, 2**16)
)
def test_fp64_forward_and_gradients(config, batch, seq_len, seed):
    """Any faithful dense config: logits, every layer's activations and every gradient equal HF (fp64)."""
    result = run_parity(_source(config), torch.float64, batch=batch, seq_len=seq_len, seed=seed, grads=True)
    assert result["pass"], _explain(result)
    assert result["metrics"]["logits"]["max_abs"] <= 1e-9
    assert result["metrics"]["activations_max_scaled"] <= 1e-9
    assert result["metrics"]["grads_max_scaled"] <= 1e-9


@settings(max_examples=8)
@given(config=dense_configs(), seq_len=st.integers(2, 16), seed=st.integers(0, 2**16))
def test_fp32_against_stock_hf(config, seq_len, seed):
    result = run_parity(_source(config), torch.float32, batch=2, seq_len=seq_len, seed=seed)
    assert result["pass"], _explain(result)
    assert result["metrics"]["logits"]["max_abs"] <= 5e-5

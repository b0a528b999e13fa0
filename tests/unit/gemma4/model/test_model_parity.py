"""Whole-model parity with HF on presets and on hypothesis-drawn faithful dense configs.

fp64 against the exact-fp64 reference: logits and every captured activation (embedding, each layer's
attention, MLP and output, final norm) <= 1e-9, and the gradient of every parameter <= 1e-9 of its scale.
fp32 against stock HF: <= 5e-5. bf16: the distribution bounds of the policy.

``pytest --impl NAME|module:attr`` runs them on another implementation under test (fixture ``impl``, default
ours); what it cannot run (a config, gradients) skips with its reason.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4.config import hf_text_config_from_any, text_spec_from_hf
from harness.parity import ParitySource, resolve_source
from harness.parity import run_parity as _run_parity
from harness.parity.run import UnsupportedByImplementation
from harness.presets import PRESETS
from harness.strategies import dense_configs


def _source(config: dict) -> ParitySource:
    cfg = hf_text_config_from_any(config)
    return ParitySource("hypothesis", cfg, text_spec_from_hf(cfg))


def _runner(impl):
    def run_parity(*args, **kwargs):
        try:
            return _run_parity(*args, impl=impl, **kwargs)
        except UnsupportedByImplementation as exc:
            pytest.skip(f"unsupported by {impl.name}: {exc}")

    return run_parity


def _compares_grads(impl) -> bool:
    """Whether ``impl`` can compare gradients (ours can; a plugin may say it cannot)."""
    from harness.parity import RunLayout

    check = getattr(impl, "supports_run", None)
    return check is None or check(RunLayout(), True) is None


def _explain(result: dict) -> str:
    return f"first divergence: {result['first_divergence']}; failures: {result['failures']}; config: {result['config']}"


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_presets(name, dtype, impl):
    run_parity = _runner(impl)
    grads = dtype == torch.float64 and _compares_grads(impl)
    result = run_parity(resolve_source(preset=name), dtype, grads=grads)
    assert result["pass"], _explain(result)
    if grads:
        assert result["metrics"]["grads_max_scaled"] <= 1e-9
        assert len(result["grads"]["per_parameter"]) > 0


@given(
    config=dense_configs(), batch=st.integers(1, 2), seq_len=st.integers(2, 16), seed=st.integers(0, 2**16)
)
def test_fp64_forward_and_gradients(impl, config, batch, seq_len, seed):
    """Any faithful dense config: logits, every layer's activations and every gradient equal HF (fp64)."""
    run_parity = _runner(impl)
    result = run_parity(_source(config), torch.float64, batch=batch, seq_len=seq_len, seed=seed, grads=True)
    assert result["pass"], _explain(result)
    assert result["metrics"]["logits"]["max_abs"] <= 1e-9
    assert result["metrics"]["activations_max_scaled"] <= 1e-9
    assert result["metrics"]["grads_max_scaled"] <= 1e-9


@settings(max_examples=8)
@given(config=dense_configs(), seq_len=st.integers(2, 16), seed=st.integers(0, 2**16))
def test_fp32_against_stock_hf(impl, config, seq_len, seed):
    run_parity = _runner(impl)
    result = run_parity(_source(config), torch.float32, batch=2, seq_len=seq_len, seed=seed)
    assert result["pass"], _explain(result)
    assert result["metrics"]["logits"]["max_abs"] <= 5e-5

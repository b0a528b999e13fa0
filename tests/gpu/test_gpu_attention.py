"""The attention paths on CUDA: flash-attn varlen on sliding layers, and the head_dim-512 full layers."""

from __future__ import annotations

import pytest
import torch
from device_parity import require_flash, run_device_parity

from gemma4.model.core_attention import attend, select_backend
from gemma4.model.sequence_layout import make_layout
from harness.parity import ParitySource
from harness.presets import preset_config_dict

pytestmark = pytest.mark.gpu


def _qkv(s: int, heads: int, groups: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s, 1, heads, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(s, 1, groups, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(s, 1, groups, d, device="cuda", generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("window", [1, 7, 64, None])
def test_flash_varlen_matches_exact_attention(window):
    """flash_attn_varlen_func(window=(W-1, 0), cu_seqlens) vs the fp64 masked softmax: its error must stay
    within 2x our eager bf16 path's own error (and 2^-8 of the output scale)."""
    require_flash()
    docs = [37, 128, 5, 90]
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    s = sum(docs)
    q, k, v = _qkv(s, 4, 2, 64, torch.bfloat16)
    layout = make_layout(s, cu_seqlens=cu, device=torch.device("cuda"))
    exact = attend(q.double(), k.double(), v.double(), layout, window, backend="dense")
    flash = attend(q, k, v, layout, window, backend="flash")
    dense = attend(q, k, v, layout, window, backend="dense")
    e_flash = float((flash.double() - exact).abs().max())
    e_dense = float((dense.double() - exact).abs().max())
    bound = max(2 * e_dense, 2.0**-8 * float(exact.abs().max()))
    print(f"\nwindow {window}: flash err {e_flash:.3e}, eager bf16 err {e_dense:.3e}, bound {bound:.3e}")
    assert e_flash <= bound


def test_model_takes_the_flash_path_on_sliding_layers(gpu_report):
    require_flash()
    result = gpu_report(
        run_device_parity(ParitySource("preset:tiny-12b", *_preset("tiny-12b")), device="cuda", seq_len=96)
    )
    assert result["pass"], result["failures"]
    assert set(result["attention_backends"].values()) == {"flash"}  # head dims 8/16 <= 256: every layer


def _preset(name):
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf

    cfg = hf_text_config_from_any(preset_config_dict(name))
    return cfg, text_spec_from_hf(cfg)


def _head_dim_512_config() -> dict:
    cfg = preset_config_dict("tiny-31b")
    cfg.update(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=1,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
        sliding_window=16,
    )
    return cfg


def test_head_dim_512_full_layers(gpu_report):
    """Released geometry (sliding d=256, full d=512, K=V, one global KV head): bf16 parity; the d=512 layers
    must not take flash (FA2 rejects d > 256) and the d=256 sliding layers take flash when installed."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf

    cfg = hf_text_config_from_any(_head_dim_512_config())
    source = ParitySource("head_dim-512", cfg, text_spec_from_hf(cfg))
    result = gpu_report(run_device_parity(source, device="cuda", seq_len=80, label="head_dim 256/512"))
    assert result["pass"], result["failures"]
    backends = result["attention_backends"]
    assert backends[2] == backends[3] == "dense"
    assert select_backend("auto", sliding=False, keys=80, head_dim=512, dtype=torch.bfloat16,
                          device=torch.device("cuda"), cp_size=1) == "dense"  # fmt: skip

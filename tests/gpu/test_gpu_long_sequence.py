"""A long sequence (8192 tokens) with the released window (1024): the sliding layers take the linear-memory
paths (flash when installed, else blockwise) and must still agree with HF's full masked attention."""

from __future__ import annotations

import pytest
import torch
from device_parity import run_device_parity

from gemma4.config import hf_text_config_from_any, text_spec_from_hf
from gemma4.model.core_attention import attend
from gemma4.model.sequence_layout import make_layout
from harness.parity import ParitySource
from harness.presets import preset_config_dict

pytestmark = pytest.mark.gpu
SEQ = 8192
WINDOW = 1024


def test_blockwise_equals_dense_at_8k_fp64():
    """Kernel level, fp64: the blockwise path computes the same masked softmax as the dense one (~1e-15)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(SEQ, 1, 2, 32, device="cuda", dtype=torch.float64, generator=gen)
    k = torch.randn(SEQ, 1, 1, 32, device="cuda", dtype=torch.float64, generator=gen)
    v = torch.randn(SEQ, 1, 1, 32, device="cuda", dtype=torch.float64, generator=gen)
    layout = make_layout(SEQ, device=torch.device("cuda"))
    dense = attend(q, k, v, layout, WINDOW, backend="dense")
    block = attend(q, k, v, layout, WINDOW, backend="blockwise")
    err = float((dense - block).abs().max())
    print(f"\nblockwise vs dense at {SEQ} tokens, window {WINDOW}: {err:.3e}")
    assert err <= 1e-12


@pytest.mark.parametrize("backend", ["auto", "blockwise"])
def test_sliding_window_8k_model(backend, gpu_report):
    raw = preset_config_dict("tiny-31b")
    raw.update(
        num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=WINDOW,
        max_position_embeddings=16384,
    )
    cfg = hf_text_config_from_any(raw)
    source = ParitySource(f"8k window {WINDOW}", cfg, text_spec_from_hf(cfg))
    result = gpu_report(
        run_device_parity(source, device="cuda", batch=1, seq_len=SEQ, backend=backend, label=f"8k {backend}")
    )
    assert result["pass"], result["failures"]
    sliding = [result["attention_backends"][i] for i in (0, 1, 3)]
    assert "dense" not in sliding, result["attention_backends"]

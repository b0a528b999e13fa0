"""Hypothesis strategies for faithful random Gemma 4 dense configs (composable and shrinkable).

Faithful to the released models' structure, at tiny size: irregular sliding/full patterns (the last
layer is always full), a full-layer head dim that differs from the sliding one (usually twice), few
global KV heads, K=V on or off, windows below/at/above the sequence length, both RoPE types with varied
parameters, softcap on or off. PLE, KV sharing and MoE are off.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

S, F = "sliding_attention", "full_attention"


@st.composite
def layer_types(draw, min_layers: int = 2, max_layers: int = 6) -> list[str]:
    """Irregular layer patterns ending in a full layer."""
    n = draw(st.integers(min_layers, max_layers))
    body = draw(st.lists(st.sampled_from([S, S, F]), min_size=n - 1, max_size=n - 1))
    return body + [F]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def dense_configs(draw, max_seq_len: int = 16) -> dict[str, Any]:
    """An HF ``config.json`` dict of a small dense Gemma 4 text model."""
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    global_head_dim = draw(st.sampled_from([2 * head_dim, 2 * head_dim, head_dim, 4 * head_dim]))
    k_eq_v = draw(st.booleans())
    rope_full: dict[str, Any] = {
        "rope_type": "proportional",
        "rope_theta": draw(st.sampled_from([1e6, 1e4, 5e5])),
        "partial_rotary_factor": draw(st.sampled_from([0.25, 0.5, 1.0, 0.125])),
    }
    if draw(st.booleans()):
        rope_full["factor"] = draw(st.sampled_from([1.0, 2.0, 8.0]))
    rope_sliding = (
        {"rope_type": "default", "rope_theta": draw(st.sampled_from([1e4, 1e3, 1e6]))}
        if draw(st.integers(0, 3))
        else dict(rope_full)
    )
    types = draw(layer_types())
    return {
        "model_type": "gemma4_text",
        "vocab_size": draw(st.integers(32, 160)),
        "hidden_size": draw(st.sampled_from([16, 32, 48])),
        "intermediate_size": draw(st.sampled_from([16, 40, 64])),
        "num_hidden_layers": len(types),
        "layer_types": types,
        "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from(_divisors(heads))),
        "num_global_key_value_heads": draw(st.sampled_from([d for d in _divisors(heads) if d <= 2])),
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "attention_k_eq_v": k_eq_v,
        "sliding_window": draw(st.integers(1, max_seq_len + 2)),
        "rope_parameters": {S: rope_sliding, F: rope_full},
        "final_logit_softcapping": draw(st.sampled_from([30.0, 30.0, 5.0, None])),
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5])),
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size_per_layer_input": 0,
        "tie_word_embeddings": draw(st.sampled_from([True, True, True, False])),
        "max_position_embeddings": 4096,
    }


@st.composite
def moe_configs(draw, max_seq_len: int = 16) -> dict[str, Any]:
    """A small 26B-A4B-style config: dense MLP beside routed experts in every layer (E >= 2, k <= E)."""
    config = draw(dense_configs(max_seq_len))
    experts = draw(st.sampled_from([2, 4, 8, 16]))
    config.update(
        enable_moe_block=True,
        num_experts=experts,
        top_k_experts=draw(st.integers(1, experts)),
        moe_intermediate_size=draw(st.sampled_from([8, 16, 24])),
    )
    return config


@st.composite
def e_series_configs(draw, max_seq_len: int = 16) -> dict[str, Any]:
    """E2B/E4B-style configs: per-layer embeddings, the last S layers reusing K/V, maybe double-wide MLPs."""
    config = draw(dense_configs(max_seq_len))
    types = config["layer_types"]
    # S must leave an earlier producer for every reused layer type (HF raises otherwise).
    valid = [s for s in range(0, len(types)) if set(types[len(types) - s :]) <= set(types[: len(types) - s])]
    config.update(
        attention_k_eq_v=draw(st.sampled_from([False, False, True])),
        hidden_size_per_layer_input=draw(st.sampled_from([4, 8])),
        vocab_size_per_layer_input=config["vocab_size"],
        num_kv_shared_layers=draw(st.sampled_from(valid)),
        use_double_wide_mlp=draw(st.booleans()),
        num_global_key_value_heads=draw(st.sampled_from([None, config["num_global_key_value_heads"]])),
    )
    return config

"""Fixtures for the slime entry-point tests: the released models' configs (facts §4) and slime-like args."""

from __future__ import annotations

import pytest

S, F = "sliding_attention", "full_attention"


def _pattern(layers: int) -> list[str]:
    return [F if (i + 1) % 6 == 0 else S for i in range(layers)]


def released_config(name: str) -> dict:
    """HF ``text_config`` of a released model (gemma4-facts.md §4; old schema with global_* fields)."""
    common = {
        "model_type": "gemma4_text",
        "vocab_size": 262144,
        "head_dim": 256,
        "global_head_dim": 512,
        "sliding_window": 1024,
        "attention_k_eq_v": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            S: {"rope_type": "default", "rope_theta": 10000.0},
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
    }
    sizes = {
        "31b": dict(hidden_size=5376, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=16,
                    num_global_key_value_heads=4, intermediate_size=21504),
        "12b": dict(hidden_size=3840, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
                    num_global_key_value_heads=1, intermediate_size=15360),
        "26b-a4b": dict(hidden_size=2816, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
                        num_global_key_value_heads=2, intermediate_size=2112, enable_moe_block=True,
                        num_experts=128, top_k_experts=8, moe_intermediate_size=704),
    }[name]  # fmt: skip
    return common | sizes | {"layer_types": _pattern(sizes["num_hidden_layers"])}


@pytest.fixture
def released():
    return released_config

"""Built-in tiny presets: the released models' structure at a size a CPU runs in milliseconds.

Faithful means (facts §4): K=V full layers with 1-2 global KV heads, full-layer head dim twice the
sliding one, an irregular sliding/full pattern ending in a full layer (consecutive full layers included:
Megatron-Bridge once broke on those), a window shorter than the default sequence, proportional RoPE
(theta 1e6, 25 % of pairs) on full layers, softcap 30, PLE off (``hidden_size_per_layer_input=0``).
"""

from __future__ import annotations

from typing import Any

from gemma4.errors import InvalidInputError

S, F = "sliding_attention", "full_attention"

_COMMON: dict[str, Any] = {
    "model_type": "gemma4_text",
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0,
    "attention_k_eq_v": True,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    # 31B: 32 heads, 16 sliding KV heads (d 256), 4 global KV heads (d 512), window 1024, 5:1 pattern.
    "tiny-31b": {
        **_COMMON,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "layer_types": [S, S, S, F, S, S, F, F],
        "sliding_window": 5,
        "max_position_embeddings": 4096,
    },
    # 12B: 16 heads, 8 sliding KV heads, 1 global KV head, window 1024, 5:1 pattern.
    "tiny-12b": {
        **_COMMON,
        "vocab_size": 320,
        "hidden_size": 48,
        "intermediate_size": 160,
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "global_head_dim": 16,
        "num_global_key_value_heads": 1,
        "layer_types": [S, S, F, S, S, S, F],
        "sliding_window": 3,
        "max_position_embeddings": 4096,
    },
    # 26B-A4B: 16 heads, 8 sliding KV heads, 2 global KV heads, window 1024, dense MLP 2112 beside 128
    # experts (top-8, 704 wide) in every layer.
    "tiny-26b-a4b": {
        **_COMMON,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 48,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 2,
        "layer_types": [S, F, S, S, S, F],
        "sliding_window": 5,
        "enable_moe_block": True,
        "num_experts": 8,
        "top_k_experts": 2,
        "moe_intermediate_size": 16,
        "max_position_embeddings": 4096,
    },
    # E2B: 35 layers of period 5 (4 sliding + 1 full), 8 heads over 1 KV head (d 256 / 512, no K=V), window
    # 512, PLE 256 per layer, the last 20 layers reuse K/V and have a double-wide MLP (6144 -> 12288).
    "tiny-e2b": {
        **_COMMON,
        "attention_k_eq_v": False,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 48,
        "num_hidden_layers": 10,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "layer_types": [S, S, S, S, F, S, S, S, S, F],
        "sliding_window": 5,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 256,
        "num_kv_shared_layers": 4,
        "use_double_wide_mlp": True,
        "max_position_embeddings": 4096,
    },
    # E4B: 42 layers of period 6, 8 heads over 2 KV heads, PLE 256, the last 18 layers reuse K/V, one MLP width.
    "tiny-e4b": {
        **_COMMON,
        "attention_k_eq_v": False,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 80,
        "num_hidden_layers": 12,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "layer_types": [S, S, S, S, S, F, S, S, S, S, S, F],
        "sliding_window": 5,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 256,
        "num_kv_shared_layers": 4,
        "use_double_wide_mlp": False,
        "max_position_embeddings": 4096,
    },
}

DEFAULT_SEQ_LEN = 24
DEFAULT_BATCH = 2


def preset_config_dict(name: str) -> dict[str, Any]:
    """The HF ``config.json`` dict of preset ``name`` (a fresh copy)."""
    if name not in PRESETS:
        raise InvalidInputError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    import copy

    return copy.deepcopy(PRESETS[name])

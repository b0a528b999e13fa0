"""Config translation: every HF config form gives the same spec; bad configs name the field."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma4Config, Gemma4TextConfig

from gemma4.config import FULL, SLIDING, text_spec_from_any
from gemma4.errors import ConfigError
from harness.presets import PRESETS, preset_config_dict

S, F = SLIDING, FULL


def _old_schema() -> dict:
    return preset_config_dict("tiny-31b")


def _new_schema() -> dict:
    """What transformers >= 5.15 writes: per_layer_config, no global_head_dim."""
    cfg = Gemma4TextConfig(**{k: v for k, v in _old_schema().items() if k != "model_type"})
    return json.loads(cfg.to_json_string())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_all_forms_agree(name, tmp_path):
    """Catches: reading config.head_dim for full layers, losing the global KV-head override, wrong text_config."""
    d = preset_config_dict(name)
    obj = Gemma4TextConfig(**{k: v for k, v in d.items() if k != "model_type"})
    specs = [
        text_spec_from_any(d),
        text_spec_from_any(obj),
        text_spec_from_any(Gemma4Config(text_config=obj)),
    ]
    new = json.loads(obj.to_json_string())
    assert "per_layer_config" in new and "global_head_dim" not in new
    specs.append(text_spec_from_any(new))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": new}))
    specs.append(text_spec_from_any(tmp_path))
    specs.append(text_spec_from_any(tmp_path / "config.json"))
    assert all(s == specs[0] for s in specs)
    s = specs[0]
    global_kv = (
        d["num_global_key_value_heads"] if d["attention_k_eq_v"] and d["num_global_key_value_heads"] else None
    )
    for i, t in enumerate(s.layer_types):
        assert s.head_dims[i] == (d["global_head_dim"] if t == F else d["head_dim"])
        assert s.num_kv_heads[i] == (
            global_kv or d["num_key_value_heads"] if t == F else d["num_key_value_heads"]
        )
        assert s.has_v_proj(i) == (not s.reuses_kv(i) and (t == S or not d["attention_k_eq_v"]))


def test_global_kv_override_only_with_k_eq_v():
    """HF applies num_global_key_value_heads only when attention_k_eq_v is true (facts §6.11)."""
    d = _old_schema() | {"attention_k_eq_v": False}
    s = text_spec_from_any(d)
    assert {s.num_kv_heads[i] for i, t in enumerate(s.layer_types) if t == F} == {d["num_key_value_heads"]}
    assert all(s.has_v_proj(i) for i in range(s.num_layers))


def test_new_schema_roundtrip_matches_old():
    assert text_spec_from_any(_new_schema()) == text_spec_from_any(_old_schema())


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 0}, "vocab_size_per_layer_input"),
        ({"num_kv_shared_layers": 8}, "num_kv_shared_layers"),
        (
            {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 5, "moe_intermediate_size": 8},
            "top_k_experts",
        ),
        ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2}, "moe_intermediate_size"),
        ({"hidden_activation": "gelu"}, "hidden_activation"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"sliding_window": 0}, "sliding_window"),
        (
            {
                "rope_parameters": {
                    S: {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                    F: {"rope_type": "default", "rope_theta": 1e6},
                }
            },
            "rope_type",
        ),
        (
            {"rope_parameters": {S: {"rope_type": "default", "rope_theta": 1e4}}},
            "rope_parameters.full_attention",
        ),
        ({"layer_types": [S, F]}, "layer_types"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_bad_configs_name_the_field(change, field):
    """Every refusal names the offending field (a user can fix it without reading our code)."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        text_spec_from_any(_old_schema() | change)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        text_spec_from_any(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        text_spec_from_any(tmp_path)


def test_wrong_model_type():
    with pytest.raises(ConfigError, match="model_type"):
        text_spec_from_any(_old_schema() | {"model_type": "llama"})


def test_head_dim_attribute_raises_in_new_transformers():
    """Guard for facts §6.10: our code must never read config.head_dim (it raises on >= 5.15)."""
    cfg = Gemma4TextConfig(**{k: v for k, v in _old_schema().items() if k != "model_type"})
    with pytest.raises(RuntimeError):
        _ = cfg.head_dim
    text_spec_from_any(cfg)  # and yet the spec builds


def test_default_rope_ignores_stray_factors_like_hf():
    """HF's default RoPE reads only rope_theta and the head dim; a stray factor must not change our tables."""
    from transformers.models.gemma4 import modeling_gemma4 as hfm

    from gemma4.model import rope

    rope_params = {
        S: {"rope_type": "default", "rope_theta": 5e4, "partial_rotary_factor": 0.5, "factor": 4.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    }
    cfg = Gemma4TextConfig(
        **{k: v for k, v in _old_schema().items() if k != "model_type"} | {"rope_parameters": rope_params}
    )
    spec = text_spec_from_any(cfg)
    hf = hfm.Gemma4TextRotaryEmbedding(cfg)
    ours = rope.inv_freq(spec.rope[S], spec.head_dim_of(S), torch.float32)
    assert torch.equal(ours, getattr(hf, f"{S}_inv_freq"))


@pytest.mark.parametrize("vocab", ["262144", 262144.0, True])
def test_a_vocab_size_that_is_not_an_integer_is_a_clear_error(vocab):
    """``vocab_size`` as a string, a float or a bool: a config error naming the field, never a ``TypeError``
    from comparing it (issue 17: the guard's ``and`` turned into ``or`` survived)."""
    from gemma4.config import hf_text_config_from_any
    from gemma4.errors import InvalidInputError
    from harness.presets import preset_config_dict

    with pytest.raises(InvalidInputError, match="vocab_size"):
        hf_text_config_from_any(preset_config_dict("tiny-12b") | {"vocab_size": vocab, "pad_token_id": 0})

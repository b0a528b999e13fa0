"""slime's streaming converter: Megatron parameters (global, TP-gathered names) -> HF's state dict exactly."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings

from gemma4.config import hf_text_config_from_any, text_spec_from_any
from gemma4.conversion import mapping
from gemma4.errors import InvalidInputError
from gemma4.slime.weight_sync import (
    MODEL_NAMES,
    ExpertStacker,
    convert_gemma4_to_hf,
    convert_to_hf,
    get_converter,
)
from harness.presets import PRESETS, preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict
from harness.strategies import dense_configs
from harness.testing.conversion import (
    key_contract_failures,
    megatron_state_from_hf,
    slime_args,
    streaming_failures,
)


def _hf_full(cfg, prefix: str = "model.", seed: int = 0, dtype=torch.float32):
    hf_cfg = hf_text_config_from_any(cfg)
    rel = hf_text_state_dict(build_reference_model(hf_cfg, dtype, seed=seed))
    full = {(k if k == "lm_head.weight" else prefix + k): v for k, v in rel.items()}
    return hf_cfg, rel, full


def _check(cfg, args, prefix="model.", dtype=torch.float32):
    hf_cfg, rel, full = _hf_full(cfg, prefix, dtype=dtype)
    model = megatron_state_from_hf(hf_cfg, rel, dtype)
    return streaming_failures(model, full, args)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_equals_hf_state_dict(name, dtype):
    """Every HF key exactly once, tensor for tensor; no v_proj on K=V layers; embed_tokens once when tied."""
    cfg = preset_config_dict(name)
    assert _check(cfg, slime_args(hf_config=cfg), dtype=dtype) == []


@given(cfg=dense_configs())
@settings(max_examples=6)
def test_streaming_random_configs(cfg):
    assert _check(cfg, slime_args(hf_config=cfg)) == []


def test_untied_head_is_lm_head(tmp_path):
    cfg = preset_config_dict("tiny-12b") | {"tie_word_embeddings": False}
    assert _check(cfg, slime_args(hf_config=cfg)) == []
    out = convert_gemma4_to_hf(slime_args(hf_config=cfg), "module.output_layer.weight", torch.zeros(320, 48))
    assert [n for n, _ in out] == ["lm_head.weight"]


def test_padded_vocabulary_is_cut_and_wrong_shapes_are_refused():
    """Megatron (slime) pads the vocabulary to a multiple of TP x 128: the padding never reaches HF names.
    Any other shape that disagrees with the config is refused, naming the tensor (a wrong slice must not
    silently reach the rollout engine)."""
    cfg = preset_config_dict("tiny-31b")
    args = slime_args(hf_config=cfg)
    padded = torch.randn(384, 64)
    ((name, emb),) = convert_gemma4_to_hf(args, "module.module.embedding.word_embeddings.weight", padded)
    assert name == "model.embed_tokens.weight" and torch.equal(emb, padded[:256])
    with pytest.raises(InvalidInputError, match="fewer than the vocabulary"):
        convert_gemma4_to_hf(args, "module.module.embedding.word_embeddings.weight", torch.zeros(255, 64))
    with pytest.raises(InvalidInputError, match="down_proj.weight.*implies \\[64, 128\\]"):
        convert_gemma4_to_hf(
            args, "module.module.decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(64, 100)
        )


def test_tied_head_is_never_exported_twice():
    cfg = preset_config_dict("tiny-31b")
    args = slime_args(hf_config=cfg)
    emb = torch.randn(256, 64)
    assert [
        n for n, _ in convert_gemma4_to_hf(args, "module.module.embedding.word_embeddings.weight", emb)
    ] == ["model.embed_tokens.weight"]
    assert convert_gemma4_to_hf(args, "module.module.output_layer.weight", emb) == []


def test_args_from_hf_checkpoint_dir_and_conditional_generation_prefix(tmp_path):
    """``args.hf_checkpoint`` (slime's flag) is enough; a multimodal config yields model.language_model.*."""
    cfg = preset_config_dict("tiny-31b")
    (tmp_path / "causal").mkdir()
    (tmp_path / "causal" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": cfg}))
    assert _check(cfg, slime_args(hf_checkpoint=str(tmp_path / "causal"))) == []
    prefix = mapping.HF_CONDITIONAL_GENERATION_PREFIX
    assert _check(cfg, slime_args(hf_checkpoint=str(tmp_path / "vlm")), prefix=prefix) == []
    forced = slime_args(hf_checkpoint=str(tmp_path / "causal"), gemma4_hf_prefix=prefix)
    assert _check(cfg, forced, prefix=prefix) == []
    spec_args = slime_args(gemma4_text_spec=text_spec_from_any(cfg))
    assert _check(cfg, spec_args) == []


def test_k_eq_v_layer_emits_q_and_k_only():
    cfg = preset_config_dict("tiny-31b")
    spec = text_spec_from_any(cfg)
    w = torch.randn((spec.num_attention_heads + 1) * 32, 64)  # layer 3: 1 KV head of dim 32, no V slot
    out = convert_gemma4_to_hf(
        slime_args(hf_config=cfg), "module.decoder.layers.3.self_attention.linear_qkv.weight", w
    )
    assert [n for n, _ in out] == [
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.weight",
    ]
    assert torch.equal(out[1][1], w[-32:])


def test_names_it_cannot_map_are_refused_naming_them():
    args = slime_args(hf_config=preset_config_dict("tiny-31b"))
    assert (
        convert_gemma4_to_hf(args, "module.decoder.layers.0.mlp.linear_fc1._extra_state", torch.zeros(1))
        == []
    )
    for bad in (
        "decoder.layers.0.mlp.mystery.weight",
        "decoder.layers.99.input_layernorm.weight",
        "rotary.inv_freq",
    ):
        with pytest.raises(InvalidInputError, match=bad.replace(".", r"\.")):
            convert_gemma4_to_hf(args, "module." + bad, torch.zeros(1))
    with pytest.raises(InvalidInputError, match="has no experts"):
        convert_gemma4_to_hf(args, "decoder.layers.0.mlp.experts.linear_fc1.weight3", torch.zeros(1))
    with pytest.raises(InvalidInputError, match="hf_checkpoint"):
        convert_gemma4_to_hf(slime_args(), "embedding.word_embeddings.weight", torch.zeros(1))


@pytest.mark.parametrize(
    "name", list(MODEL_NAMES) + ["Gemma4ForCausalLM", "GEMMA-4", "Gemma4ForConditionalGeneration"]
)
def test_dispatcher_accepts_gemma4_names(name):
    assert get_converter(name) is convert_gemma4_to_hf


@pytest.mark.parametrize("name", ["gemma3", "llama", "qwen3moe", "gemma4x", ""])
def test_dispatcher_refuses_other_models_naming_them(name):
    with pytest.raises(InvalidInputError, match=repr(name)):
        get_converter(name)


def test_convert_to_hf_dispatches():
    cfg = preset_config_dict("tiny-12b")
    out = convert_to_hf(slime_args(hf_config=cfg), "gemma4", "decoder.final_layernorm.weight", torch.ones(48))
    assert [n for n, _ in out] == ["model.norm.weight"]


# ---- experts: one call per expert, any order, reassembled only where a fused tensor is needed ---------


def test_experts_stream_one_at_a_time_and_restack_to_hf():
    """Global expert e of either Megatron naming -> slice e of HF's fused tensor, in any arrival order."""
    spec = text_spec_from_any(
        preset_config_dict("tiny-26b-a4b") | {"num_experts": 4, "moe_intermediate_size": 5}
    )
    args = slime_args(gemma4_text_spec=spec)
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(4, 10, 64, generator=gen)
    down = torch.randn(4, 64, 5, generator=gen)
    calls = []
    for e in (2, 0, 3, 1):  # e.g. EP rank 1 first
        calls.append(
            (f"module.module.decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc1.weight", gate_up[e])
        )
        calls.append((f"module.module.decoder.layers.3.mlp.experts.linear_fc2.weight{e}", down[e]))
    stacker = ExpertStacker(4)
    fused = []
    produced = []
    for name, t in calls:
        pairs = convert_gemma4_to_hf(args, name, t)
        produced += [n for n, _ in pairs]
        for n, x in pairs:
            fused += stacker.add(n, x)
    assert (
        key_contract_failures(
            produced,
            [
                f"model.layers.3.experts.{e}.{k}.weight"
                for e in range(4)
                for k in ("gate_proj", "up_proj", "down_proj")
            ],
        )
        == []
    )
    per_expert = dict(p for name, t in calls for p in convert_gemma4_to_hf(args, name, t))
    assert torch.equal(per_expert["model.layers.3.experts.2.gate_proj.weight"], gate_up[2][:5])  # (out, in)
    assert torch.equal(per_expert["model.layers.3.experts.2.up_proj.weight"], gate_up[2][5:])
    assert torch.equal(per_expert["model.layers.3.experts.1.down_proj.weight"], down[1])
    got = dict(fused)
    assert sorted(got) == ["model.layers.3.experts.down_proj", "model.layers.3.experts.gate_up_proj"]
    assert torch.equal(got["model.layers.3.experts.gate_up_proj"], gate_up)
    assert torch.equal(got["model.layers.3.experts.down_proj"], down)
    assert stacker.pending == {}
    with pytest.raises(InvalidInputError, match="arrived twice"):
        stacker.add("model.layers.3.experts.0.down_proj.weight", down[0])
        stacker.add("model.layers.3.experts.0.down_proj.weight", down[0])


def test_rank_local_expert_names_are_refused_at_ep_above_one():
    """slime leaves SequentialMLP expert indices rank-local; at EP > 1 such a name is refused, named; the
    global TE-style name (what ``with_global_expert_names`` makes) is accepted."""
    import types

    from gemma4.slime.weight_sync import slime_global_expert_name

    spec = text_spec_from_any(
        preset_config_dict("tiny-26b-a4b") | {"num_experts": 4, "moe_intermediate_size": 5}
    )
    local = "module.module.decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"
    args = types.SimpleNamespace(gemma4_text_spec=spec, expert_model_parallel_size=2)
    with pytest.raises(InvalidInputError, match="expert-parallel size 2.*rank-local"):
        convert_gemma4_to_hf(args, local, torch.zeros(64, 5))
    glob = slime_global_expert_name(local, ep_rank=1, ep_size=2, num_experts=4)
    assert glob == "module.module.decoder.layers.3.mlp.experts.linear_fc2.weight3"
    assert [n for n, _ in convert_gemma4_to_hf(args, glob, torch.zeros(64, 5))] == [
        "model.layers.3.experts.3.down_proj.weight"
    ]
    with pytest.raises(InvalidInputError, match="names expert 4; the model has 4"):
        convert_gemma4_to_hf(args, glob[:-1] + "4", torch.zeros(64, 5))


def test_rewritten_config_is_reread(tmp_path):
    """The parsed config is cached on args, but a config.json rewritten at the same path is read again."""
    import json
    import types

    from gemma4.slime.weight_sync import resolve_target
    from harness.presets import preset_config_dict

    cfg = preset_config_dict("tiny-31b")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args = types.SimpleNamespace(hf_checkpoint=str(tmp_path))
    assert resolve_target(args)[0].num_layers == 8
    cfg = preset_config_dict("tiny-12b")
    (tmp_path / "config.json").write_text(json.dumps(cfg) + "\n\n")  # new size, so a new stamp
    assert resolve_target(args)[0].num_layers == 7

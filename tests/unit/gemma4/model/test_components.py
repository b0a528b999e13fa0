"""Component parity against the HF modules themselves (transformers 5.24 ``modeling_gemma4``).

Each test names the bug it exists to catch. fp32 comparisons are bitwise where we mirror HF op for op.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma4 import modeling_gemma4 as hfm

from gemma4.config import FULL, SLIDING, hf_text_config_from_any, text_spec_from_hf
from gemma4.model import rope
from gemma4.model.gpt_model import embedding_scale, softcap
from gemma4.model.norms import rms_norm
from gemma4.model.spec import get_gemma4_layer_spec
from gemma4.model.transformer_config import config_for_layer, make_transformer_config
from gemma4.runtime import init_single_process
from harness.presets import preset_config_dict
from harness.reference import build_reference_model

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _hf_cfg(name="tiny-31b", **changes):
    return hf_text_config_from_any(preset_config_dict(name) | changes)


# ---- RMSNorm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [True, False])
def test_rmsnorm_matches_hf_bitwise(dtype, with_scale):
    """Catches: `1 + w` (Gemma 1-3 style), rsqrt vs pow, norm computed in bf16, weight applied after cast."""
    gen = torch.Generator().manual_seed(0)
    hf = hfm.Gemma4RMSNorm(32, eps=1e-6, with_scale=with_scale).to(dtype)
    if with_scale:
        with torch.no_grad():
            hf.weight.copy_(torch.rand(32, generator=gen) + 0.5)
    x = (torch.randn(3, 5, 32, generator=gen) * 4).to(dtype)
    ours = rms_norm(x, hf.weight if with_scale else None, 1e-6)
    assert torch.equal(ours, hf(x))


def test_rmsnorm_fp64_is_true_fp64():
    """In fp64 runs our norm must not round through fp32 (stock HF does; facts §6.23)."""
    x = torch.randn(4, 16, dtype=torch.float64)
    w = torch.rand(16, dtype=torch.float64) + 0.5
    exact = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    assert (rms_norm(x, w, 1e-6) - exact).abs().max() < 1e-15


# ---- RoPE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-31b", "tiny-12b"])
@pytest.mark.parametrize(
    "prf, theta, factor", [(0.25, 1e6, 1.0), (0.5, 1e4, 1.0), (1.0, 5e5, 2.0), (0.125, 1e6, 8.0)]
)
def test_inv_freq_matches_hf_buffers(name, prf, theta, factor):
    """Catches: proportional denominator = rotary dim instead of head dim, factor ignored, wrong theta per type."""
    full = {"rope_type": "proportional", "partial_rotary_factor": prf, "rope_theta": theta, "factor": factor}
    cfg = _hf_cfg(name, rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 1e4}, FULL: full})
    spec = text_spec_from_hf(cfg)
    hf = hfm.Gemma4TextRotaryEmbedding(cfg)
    for t in (SLIDING, FULL):
        ours = rope.inv_freq(spec.rope[t], spec.head_dim_of(t), torch.float32)
        assert torch.equal(ours, getattr(hf, f"{t}_inv_freq")), t


def test_proportional_rope_pair_layout():
    """Catches Megatron's rotary_percent layout: full layers must rotate dims [0, n) with [d/2, d/2 + n)."""
    cfg = _hf_cfg()
    spec = text_spec_from_hf(cfg)
    d = spec.head_dim_of(FULL)
    n_rot = int(0.25 * d // 2)
    pos = torch.arange(7)[None]
    angles = rope.angles_for(spec, rope.rope_angles(spec, pos, torch.float32), FULL)
    _, sin = rope.cos_sin(angles, torch.float32)
    nonzero = (sin.abs() > 0).any(dim=(0, 1, 2)).nonzero().flatten().tolist()
    assert nonzero == list(range(0, n_rot)) + list(range(d // 2, d // 2 + n_rot))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_applied_rotation_matches_hf(dtype, layer_type):
    """Catches: interleaved (GPT-J) pairs instead of NeoX halves, cos/sin cast at the wrong point, sign of sin."""
    cfg = _hf_cfg()
    spec = text_spec_from_hf(cfg)
    d = spec.head_dim_of(layer_type)
    gen = torch.Generator().manual_seed(1)
    x_hf = torch.randn(2, 9, 3, d, generator=gen).to(dtype)  # [b, s, heads, d]
    pos = torch.arange(9)[None].expand(2, -1)
    hf_rot = hfm.Gemma4TextRotaryEmbedding(cfg)
    cos_hf, sin_hf = hf_rot(x_hf, pos, layer_type)
    ref = hfm.apply_rotary_pos_emb(x_hf, cos_hf, sin_hf, unsqueeze_dim=2)
    angles = rope.angles_for(spec, rope.rope_angles(spec, pos, dtype), layer_type)
    cos, sin = rope.cos_sin(angles, dtype)  # [s, b, 1, d]
    ours = rope.apply_rotary(x_hf.transpose(0, 1), cos, sin).transpose(0, 1)
    if dtype == torch.float64:  # stock HF builds the tables in fp32; ours are true fp64
        assert (ours - ref).abs().max() < 1e-6
    else:
        assert torch.equal(ours, ref)


# ---- attention, MLP ------------------------------------------------------------------------------------


def _attention_pair(layer_idx: int, dtype: torch.dtype, k_eq_v: bool = True):
    init_single_process()
    hf_cfg = _hf_cfg(attention_k_eq_v=k_eq_v)
    spec = text_spec_from_hf(hf_cfg)
    ref_model = build_reference_model(hf_cfg, dtype, seed=3)
    hf_attn = ref_model.model.layers[layer_idx].self_attn
    tcfg = make_transformer_config(spec, dtype)
    layer_spec = get_gemma4_layer_spec(spec, layer_idx)
    ours = build_module(
        layer_spec.submodules.self_attention,
        config=config_for_layer(tcfg, layer_idx),
        layer_number=layer_idx + 1,
    )
    from gemma4.conversion.mapping import pack_qkv

    with torch.no_grad():
        p = {k: v for k, v in hf_attn.state_dict().items()}
        ours.linear_qkv.weight.copy_(
            pack_qkv(
                p["q_proj.weight"],
                p["k_proj.weight"],
                p.get("v_proj.weight"),
                spec.num_attention_heads,
                spec.num_kv_heads[layer_idx],
                spec.head_dims[layer_idx],
            )
        )
        ours.linear_proj.weight.copy_(p["o_proj.weight"])
        ours.q_layernorm.weight.copy_(p["q_norm.weight"])
        ours.k_layernorm.weight.copy_(p["k_norm.weight"])
    return hf_cfg, spec, ref_model, hf_attn, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k_eq_v", [True, False])
@pytest.mark.parametrize("layer_idx", [0, 3])  # tiny-31b: layer 0 sliding, layer 3 full
def test_attention_matches_hf(layer_idx, dtype, k_eq_v):
    """Catches: window off by one, scale 1/sqrt(d) instead of 1, V after k_norm or RoPE, missing v_norm,
    GQA head grouping, q/k norm weights swapped, K=V layer reading a V slot."""
    hf_cfg, spec, ref_model, hf_attn, ours = _attention_pair(layer_idx, dtype, k_eq_v)
    b, s = 2, 11
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(b, s, spec.hidden_size, generator=gen).to(dtype)
    pos = torch.arange(s)[None]
    layer_type = spec.layer_types[layer_idx]
    cos, sin = ref_model.model.rotary_emb(h, pos, layer_type)
    mask_fn = create_sliding_window_causal_mask if layer_type == SLIDING else create_causal_mask
    mask = mask_fn(
        config=ref_model.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos
    )
    with torch.no_grad():
        ref, _ = hf_attn(h, (cos, sin), mask, shared_kv_states={})
        angles = rope.rope_angles(spec, pos.expand(b, -1), dtype)
        out, _ = ours(h.transpose(0, 1), attention_mask=None, rotary_pos_emb=angles)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (out.transpose(0, 1) - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_matches_hf(dtype):
    """Catches: erf GELU instead of tanh, gate/up halves swapped in linear_fc1, activation on the up half."""
    init_single_process()
    hf_cfg = _hf_cfg()
    spec = text_spec_from_hf(hf_cfg)
    ref_model = build_reference_model(hf_cfg, dtype, seed=4)
    hf_mlp = ref_model.model.layers[1].mlp
    ours = build_module(
        get_gemma4_layer_spec(spec, 1).submodules.mlp,
        config=config_for_layer(make_transformer_config(spec, dtype), 1),
    )
    with torch.no_grad():
        ours.linear_fc1.weight.copy_(torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
        ours.linear_fc2.weight.copy_(hf_mlp.down_proj.weight)
        x = torch.randn(5, 2, spec.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
        out, _ = ours(x)
        ref = hf_mlp(x.transpose(0, 1)).transpose(0, 1)
    assert torch.equal(out, ref)


# ---- embedding scale, softcap ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden, expected", [(1536, 39.25), (2560, 50.5), (2816, 53.0), (3840, 62.0), (5376, 73.5)]
)
def test_embedding_scale_rounds_like_hf_in_bf16(hidden, expected):
    """Catches: multiplying by the Python float sqrt(H) in bf16 models (facts §2.1 table)."""
    assert float(embedding_scale(hidden, torch.bfloat16)) == expected
    emb = hfm.Gemma4TextScaledWordEmbedding(4, hidden, 0, embed_scale=hidden**0.5).to(torch.bfloat16)
    assert float(emb.embed_scale.to(torch.bfloat16)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_embedding_scale_is_fp32_rounded_sqrt(dtype):
    """HF's buffer is an fp32 tensor: even fp64 runs multiply by fp32(sqrt(H)) (facts §6.23)."""
    assert float(embedding_scale(3840, dtype)) == float(torch.tensor(3840**0.5, dtype=torch.float32))


def test_softcap_matches_hf_head():
    """Catches: softcap missing, applied twice, or with the wrong constant. Oracle: HF with and without it."""
    cfg = _hf_cfg(final_logit_softcapping=5.0)
    capped = build_reference_model(cfg, torch.float32, seed=6)
    plain = build_reference_model(_hf_cfg(final_logit_softcapping=None), torch.float32, seed=6)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = capped(input_ids=ids).logits
        b = plain(input_ids=ids).logits
    assert b.abs().max() > 5.0  # the cap is active
    assert torch.equal(softcap(b, 5.0), a)
    assert softcap(b, None) is b


# ---- Megatron API surface ------------------------------------------------------------------------------


def _megatron_private_overrides(cls: type) -> list[str]:
    """Methods ``cls`` itself defines named ``_x`` (not dunders) that a Megatron base class of it also
    defines: overriding those ties us to Megatron internals that change between releases."""
    import inspect

    bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] == "megatron"]
    found = []
    for name, value in vars(cls).items():
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        if not (inspect.isfunction(value) or isinstance(value, (property, staticmethod, classmethod))):
            continue  # e.g. ABCMeta's per-class ``_abc_impl``
        found += [
            f"{cls.__module__}.{cls.__qualname__}.{name} (private in {b.__qualname__})"
            for b in bases
            if name in vars(b)
        ]
    return found


def _gemma4_model_classes() -> list[type]:
    import importlib
    import inspect
    import pkgutil

    import gemma4.model

    classes = []
    for info in pkgutil.iter_modules(gemma4.model.__path__):
        module = importlib.import_module(f"gemma4.model.{info.name}")
        classes += [
            c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__
        ]
    return classes


def test_no_gemma4_model_class_overrides_a_megatron_private():
    """Catches: a private Megatron method overridden again (e.g. ``GPTModel._preprocess``, whose signature
    and call sites changed between releases; slime runs a newer Megatron). Use public methods/arguments."""
    from gemma4.model.gpt_model import Gemma4Model

    classes = _gemma4_model_classes()
    assert Gemma4Model in classes and len(classes) >= 10
    offenders = [o for cls in classes for o in _megatron_private_overrides(cls)]
    assert not offenders, offenders
    # The check itself sees an override, also of a deeper Megatron base's (LanguageModule) private.
    planted = type(
        "Planted",
        (Gemma4Model,),
        {"_preprocess": lambda self: None, "_set_attention_backend": lambda self: None},
    )
    assert len(_megatron_private_overrides(planted)) == 2

"""The TE -> local rewrite against a spec that names TE classes (as Megatron binds them without TE)."""

from __future__ import annotations

import pytest


def _te_spec():
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    dense = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear),
    )
    attn = ModuleSpec(
        module=SelfAttention,
        submodules=SelfAttentionSubmodules(
            linear_qkv=TELayerNormColumnParallelLinear,
            core_attention=TEDotProductAttention,
            linear_proj=TERowParallelLinear,
            q_layernorm=TENorm,
            k_layernorm=TENorm,
        ),
    )
    moe = get_moe_module_spec_for_backend(backend=TESpecProvider(), num_experts=4, moe_grouped_gemm=True)
    layer = ModuleSpec(
        module=TransformerLayer, submodules=TransformerLayerSubmodules(self_attention=attn, mlp=dense)
    )
    return layer, moe, TEColumnParallelLinear


def test_rewrites_every_te_class_and_moves_fused_norms():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe.experts import SequentialMLP

    from harness.compat.te_local import LocalNorm, find_te, localize_spec

    layer, moe, _ = _te_spec()
    assert find_te(layer) and find_te(moe)
    out = localize_spec(layer)
    assert find_te(out) == []
    sub = out.submodules
    assert sub.input_layernorm is LocalNorm and sub.pre_mlp_layernorm is LocalNorm
    a = sub.self_attention.submodules
    assert a.linear_qkv is ColumnParallelLinear and a.linear_proj is RowParallelLinear
    assert a.core_attention is DotProductAttention and a.q_layernorm is LocalNorm
    assert sub.mlp.submodules.linear_fc1 is ColumnParallelLinear
    assert find_te(layer)  # the input spec is untouched
    m = localize_spec(moe)
    assert find_te(m) == [] and m.submodules.experts.module is SequentialMLP


def test_fused_linear_where_norm_slot_is_taken_is_refused():
    import dataclasses

    from harness.compat.te_local import LocalNorm, TELocalizationError, localize_spec

    layer, _, _ = _te_spec()
    bad = dataclasses.replace(layer.submodules, input_layernorm=LocalNorm)
    with pytest.raises(TELocalizationError, match="normed twice"):
        localize_spec(bad)


def test_localized_globals_and_param_names():
    import types

    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TENorm

    from harness.compat.te_local import LocalNorm, localized_globals, te_to_local_param_name

    mod = types.ModuleType("fake_plugin")
    mod.TENorm, mod.Fused = TENorm, TELayerNormColumnParallelLinear
    with localized_globals(mod) as rep:
        assert mod.TENorm is LocalNorm and mod.Fused is TELayerNormColumnParallelLinear
        assert rep == {"fake_plugin": ["TENorm"]}
    assert mod.TENorm is TENorm
    assert te_to_local_param_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == (
        "decoder.layers.0.input_layernorm.weight"
    )
    assert te_to_local_param_name("decoder.layers.1.mlp.experts.linear_fc2.weight3") == (
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    )


def test_local_norm_builds_and_rejects_zero_centered():
    import torch
    from megatron.core.transformer import TransformerConfig

    from harness.compat.te_local import LocalNorm, TELocalizationError

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm")
    assert isinstance(LocalNorm(cfg, 8, eps=1e-6), torch.nn.RMSNorm)
    cfg.layernorm_zero_centered_gamma = True
    with pytest.raises(TELocalizationError):
        LocalNorm(cfg, 8)

"""Layer and block ``ModuleSpec``s for Gemma 4 (Megatron's local spec with Gemma 4 submodules swapped in).

Every layer gets its own spec: the attention type decides the core attention's window, the K=V layers get
a ``linear_qkv`` without V slot, and ``layer_index`` tells the layer which head geometry it has.
"""

from __future__ import annotations

import functools

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from gemma4.config import SLIDING, Gemma4TextSpec
from gemma4.model.attention import Gemma4SelfAttention, KEqVColumnParallelLinear, QOnlyColumnParallelLinear
from gemma4.model.core_attention import Gemma4CoreAttention
from gemma4.model.layer import Gemma4TransformerLayer, Gemma4TransformerLayerSubmodules
from gemma4.model.moe import Gemma4MoELayer, Gemma4Router
from gemma4.model.norms import Gemma4RMSNorm


def get_gemma4_layer_spec(spec: Gemma4TextSpec, layer_index: int) -> ModuleSpec:
    """Spec of decoder layer ``layer_index`` (0-based, global)."""
    sliding = spec.layer_types[layer_index] == SLIDING
    k_eq_v = spec.attention_k_eq_v and not sliding
    reuse = spec.reuses_kv(layer_index)
    linear_qkv = (
        QOnlyColumnParallelLinear if reuse else KEqVColumnParallelLinear if k_eq_v else ColumnParallelLinear
    )
    attention = ModuleSpec(
        module=Gemma4SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=functools.partial(
                Gemma4CoreAttention, sliding_window=spec.sliding_window if sliding else None
            ),
            linear_proj=RowParallelLinear,
            q_layernorm=Gemma4RMSNorm,
            k_layernorm=None if reuse else Gemma4RMSNorm,  # reuse layers own no K weights
        ),
    )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    pre_mlp_norm = Gemma4RMSNorm
    if spec.enable_moe:
        experts = ModuleSpec(
            module=SequentialMLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        )
        mlp = ModuleSpec(
            module=Gemma4MoELayer,
            params={"dense_mlp": mlp, "norm": Gemma4RMSNorm},
            submodules=MoESubmodules(experts=experts, router=Gemma4Router),
        )
        pre_mlp_norm = IdentityOp  # the MoE block norms its two inputs itself
    return ModuleSpec(
        module=Gemma4TransformerLayer,
        params={"layer_index": layer_index},
        submodules=Gemma4TransformerLayerSubmodules(
            input_layernorm=Gemma4RMSNorm,
            self_attention=attention,
            post_self_attn_layernorm=Gemma4RMSNorm,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            post_mlp_layernorm=Gemma4RMSNorm,
            per_layer_input_gate=ColumnParallelLinear if spec.ple_dim else None,
            per_layer_projection=RowParallelLinear if spec.ple_dim else None,
            post_per_layer_input_norm=Gemma4RMSNorm if spec.ple_dim else None,
        ),
    )


def get_gemma4_decoder_block_spec(config, vp_stage: int | None = None, pp_rank: int | None = None):
    """Block spec holding this pipeline stage's layers (all of them without pipeline parallelism)."""
    spec: Gemma4TextSpec = config.gemma4
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    layers = [get_gemma4_layer_spec(spec, offset + i) for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=Gemma4RMSNorm)

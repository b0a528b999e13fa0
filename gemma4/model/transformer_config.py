"""Megatron ``TransformerConfig`` for Gemma 4, plus the per-layer copies heterogeneous layers need.

Megatron assumes one ``kv_channels`` / ``num_query_groups`` for the whole block; Gemma 4 full-attention
layers have their own (``global_head_dim``, global KV heads). Each layer therefore gets a shallow copy of
the config with its own geometry (:func:`config_for_layer`), the way Megatron-Bridge does it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from gemma4.config import Gemma4TextSpec
from gemma4.errors import ConfigError


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``gelu_pytorch_tanh``: the tanh approximation HF uses everywhere in Gemma 4 (not erf GELU)."""
    return F.gelu(x, approximate="tanh")


@dataclass
class Gemma4TransformerConfig(TransformerConfig):
    """``TransformerConfig`` plus the Gemma 4 fields the custom modules read."""

    gemma4: Gemma4TextSpec | None = field(default=None, repr=False)
    layer_type: str | None = None
    # Core-attention path: "auto", "dense", "blockwise" or "flash" (see gemma4.model.core_attention).
    gemma4_attention_backend: str = "auto"


def make_transformer_config(
    spec: Gemma4TextSpec,
    dtype: torch.dtype = torch.float32,
    *,
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    **overrides,
) -> Gemma4TransformerConfig:
    """Translate a :class:`Gemma4TextSpec` into a Megatron config (block defaults = sliding geometry)."""
    base_type = spec.layer_types[0]
    first = spec.layer_types.index(base_type)
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads[first],
        kv_channels=spec.head_dims[first],
        gated_linear_unit=True,
        activation_func=gelu_tanh,
        add_bias_linear=False,
        add_qkv_bias=False,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        layernorm_zero_centered_gamma=False,
        qk_layernorm=True,
        softmax_scale=1.0,
        hidden_dropout=0.0,
        attention_dropout=spec.attention_dropout,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tensor_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        gemma4=spec,
        layer_type=None,
    )
    if spec.enable_moe:
        kwargs.update(
            num_moe_experts=spec.num_experts,
            moe_router_topk=spec.top_k_experts,
            moe_ffn_hidden_size=spec.moe_intermediate_size,
            moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="none",
            moe_router_pre_softmax=True,  # HF: softmax over all experts, then top-k (Gemma4Router does it)
            moe_aux_loss_coeff=0.0,  # HF trains without one; a user may ask for it via overrides
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    kwargs.update(overrides)
    config = Gemma4TransformerConfig(**kwargs)
    if config.pipeline_model_parallel_size > 1 and (spec.ple_dim or any(spec.kv_sharing_reuse)):
        raise ConfigError(
            "pipeline parallelism with per-layer embeddings or KV sharing is not supported: shared K/V and "
            "the PLE inputs travel from layer to layer inside one stage (use pipeline_model_parallel_size 1)"
        )
    return config


def config_for_layer(config: Gemma4TransformerConfig, layer_index: int) -> Gemma4TransformerConfig:
    """Shallow copy of ``config`` with layer ``layer_index``'s (0-based, global) head geometry."""
    spec = config.gemma4
    layer_cfg = copy.copy(config)
    layer_cfg.layer_type = spec.layer_types[layer_index]
    layer_cfg.kv_channels = spec.head_dims[layer_index]
    layer_cfg.num_query_groups = spec.num_kv_heads[layer_index]
    if spec.intermediate_sizes:  # double-wide MLP on KV-shared layers (E2B)
        layer_cfg.ffn_hidden_size = spec.intermediate_sizes[layer_index]
    return layer_cfg

"""Gemma 4 decoder layer: Megatron's ``TransformerLayer`` with sandwich norms and ``layer_scalar``.

HF ``Gemma4TextDecoderLayer`` (facts §2.2)::

    x = x + post_attention_norm(attn(input_norm(x)))
    x = x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))
    x = x * layer_scalar                       # the whole stream, residual included

On MoE layers ``mlp`` is :class:`gemma4.model.moe.Gemma4MoELayer` (dense branch + routed experts with their
own norms), ``pre_mlp_layernorm`` is the identity and ``post_mlp_layernorm`` is ``post_feedforward_layernorm``.

Megatron builds ``input_layernorm``, ``self_attention``, ``pre_mlp_layernorm`` and ``mlp`` from the spec;
this subclass adds ``post_self_attn_layernorm``, ``post_mlp_layernorm`` and the persistent ``layer_scalar``
buffer (loaded from the checkpoint; never assumed to be 1), and gives each layer its own head geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from gemma4.model.transformer_config import config_for_layer


@dataclass
class Gemma4TransformerLayerSubmodules(TransformerLayerSubmodules):
    """Megatron's layer submodules plus Gemma 4's post-attention and post-MLP norms."""

    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


class Gemma4TransformerLayer(TransformerLayer):
    """One Gemma 4 decoder layer; ``layer_index`` (0-based, global) selects its type and geometry."""

    def __init__(
        self,
        config,
        submodules: Gemma4TransformerLayerSubmodules,
        layer_number: int = 1,
        *,
        layer_index: int,
        **kwargs,
    ) -> None:
        layer_config = config_for_layer(config, layer_index)
        super().__init__(layer_config, submodules, layer_number, **kwargs)
        self.layer_index = layer_index
        self.layer_type = layer_config.layer_type
        self.post_self_attn_layernorm = build_module(
            submodules.post_self_attn_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.post_mlp_layernorm = build_module(
            submodules.post_mlp_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.register_buffer("layer_scalar", torch.ones(1, dtype=self.config.params_dtype), persistent=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context=None,
        context_mask=None,
        rotary_pos_emb: torch.Tensor | None = None,
        attention_bias=None,
        inference_context=None,
        packed_seq_params=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, h]`` -> (``[s, b, h]``, context)."""
        residual = hidden_states
        attn_out, attn_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
        )
        if attn_bias is not None:
            attn_out = attn_out + attn_bias
        hidden_states = residual + self.post_self_attn_layernorm(attn_out)

        residual = hidden_states
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        hidden_states = residual + self.post_mlp_layernorm(mlp_out)

        hidden_states = hidden_states * self.layer_scalar
        return hidden_states, context

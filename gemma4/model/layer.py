"""Gemma 4 decoder layer: Megatron's ``TransformerLayer`` with sandwich norms and ``layer_scalar``.

HF ``Gemma4TextDecoderLayer`` (facts §2.2)::

    x = x + post_attention_norm(attn(input_norm(x)))
    x = x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))
    x = x + post_per_layer_input_norm(proj(gelu(gate(x)) * ple_l))   # E2B/E4B (PLE) only
    x = x * layer_scalar                       # the whole stream, residual included

On MoE layers ``mlp`` is :class:`gemma4.model.moe.Gemma4MoELayer` (dense branch + routed experts with their
own norms), ``pre_mlp_layernorm`` is the identity and ``post_mlp_layernorm`` is ``post_feedforward_layernorm``.

Megatron builds ``input_layernorm``, ``self_attention``, ``pre_mlp_layernorm`` and ``mlp`` from the spec;
this subclass adds ``post_self_attn_layernorm``, ``post_mlp_layernorm``, the PLE modules when the model has
per-layer embeddings, and the persistent ``layer_scalar`` buffer (loaded from the checkpoint; never assumed
to be 1), and gives each layer its own head geometry and MLP width. Per-layer inputs and shared K/V arrive
in the carry that Megatron threads as ``context`` (see :mod:`gemma4.model.carry`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import scatter_to_tensor_model_parallel_region
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from gemma4.model.carry import carry_layout
from gemma4.model.transformer_config import config_for_layer, gelu_tanh


@dataclass
class Gemma4TransformerLayerSubmodules(TransformerLayerSubmodules):
    """Megatron's layer submodules plus Gemma 4's post-attention/post-MLP norms and the PLE modules."""

    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp
    per_layer_input_gate: ModuleSpec | type | None = None  # H -> P, column parallel
    per_layer_projection: ModuleSpec | type | None = None  # P -> H, row parallel
    post_per_layer_input_norm: ModuleSpec | type | None = None


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
        spec = layer_config.gemma4
        self.gemma4 = spec
        self.layer_index = layer_index
        self.layer_type = layer_config.layer_type
        self.reuses_kv = spec.reuses_kv(layer_index)
        self.stores_kv = spec.stores_kv(layer_index)

        def norm(sub):
            return build_module(
                sub,
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )

        self.post_self_attn_layernorm = norm(submodules.post_self_attn_layernorm)
        self.post_mlp_layernorm = norm(submodules.post_mlp_layernorm)
        if spec.ple_dim:
            cfg, p = self.config, spec.ple_dim
            self.per_layer_input_gate = build_module(
                submodules.per_layer_input_gate,
                cfg.hidden_size,
                p,
                config=cfg,
                init_method=cfg.init_method,
                bias=False,
                gather_output=False,
                skip_bias_add=False,
                tp_group=self.tp_group,
            )
            self.per_layer_projection = build_module(
                submodules.per_layer_projection,
                p,
                cfg.hidden_size,
                config=cfg,
                init_method=cfg.output_layer_init_method,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=False,
                tp_group=self.tp_group,
            )
            self.post_per_layer_input_norm = norm(submodules.post_per_layer_input_norm)
        self.register_buffer("layer_scalar", torch.ones(1, dtype=self.config.params_dtype), persistent=True)

    def _carry_layout(self, hidden_states: torch.Tensor):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        s_kv = hidden_states.shape[0] * (tp if self.config.sequence_parallel else 1)
        return carry_layout(self.gemma4, hidden_states.shape[0], s_kv, hidden_states.shape[1], tp)

    def _per_layer_input(self, carry: torch.Tensor, layout) -> torch.Tensor:
        """This layer's PLE slice ``[s, b, P / tp]`` (full local sequence, this rank's part of P)."""
        ple = layout.ple.read(carry)[:, :, self.layer_index]
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            # Every rank holds the full PLE tensor and uses its part of P: split forward, all-gather backward,
            # so each rank's copy gets the complete gradient.
            ple = scatter_to_tensor_model_parallel_region(ple)
        return ple

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask=None,
        rotary_pos_emb: torch.Tensor | None = None,
        attention_bias=None,
        inference_context=None,
        packed_seq_params=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, h]`` -> (``[s, b, h]``, carry)."""
        carry = context
        layout = self._carry_layout(hidden_states) if carry is not None else None
        shared_kv = None
        if self.reuses_kv:
            if layout is None:
                raise ValueError(
                    f"layer {self.layer_index} reuses K/V but no carry was passed (use Gemma4Model)"
                )
            shared_kv = (layout.keys[self.layer_type].read(carry), layout.values[self.layer_type].read(carry))
        store = self.stores_kv and layout is not None and self.layer_type in layout.keys

        residual = hidden_states
        out = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            shared_kv=shared_kv,
            return_kv=store,
        )
        attn_out, attn_bias = out[0], out[1]
        if store:  # later reuse layers of this type read these (post-norm, post-RoPE K; v-normed V)
            key, value = out[2]
            carry = layout.keys[self.layer_type].write(carry, key)
            carry = layout.values[self.layer_type].write(carry, value)
        if attn_bias is not None:
            attn_out = attn_out + attn_bias
        hidden_states = residual + self.post_self_attn_layernorm(attn_out)

        residual = hidden_states
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        hidden_states = residual + self.post_mlp_layernorm(mlp_out)

        if self.gemma4.ple_dim:
            residual = hidden_states
            gate, _ = self.per_layer_input_gate(hidden_states)
            gated = gelu_tanh(gate) * self._per_layer_input(carry, layout)
            projected, _ = self.per_layer_projection(gated)
            hidden_states = residual + self.post_per_layer_input_norm(projected)

        hidden_states = hidden_states * self.layer_scalar
        return hidden_states, carry

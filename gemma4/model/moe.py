"""The Gemma 4 MoE block (26B-A4B) on Megatron-Core: a dense MLP and routed experts side by side.

HF ``Gemma4TextDecoderLayer`` with ``enable_moe_block`` (facts §2.5), for the residual stream ``r``::

    dense   = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(r)))
    routed  = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(r), router(r)))
    output  = dense + routed          # the layer then applies post_feedforward_layernorm and adds r

The router sees the *raw* residual (its own scaleless RMSNorm inside), the experts a differently normed
copy. :class:`Gemma4MoELayer` is Megatron's ``MoELayer`` (router, token dispatcher, ``SequentialMLP``
experts) fed the raw residual: routing uses it as is, and the experts' norm is applied in ``preprocess``,
before dispatch (RMSNorm is per token, so it commutes with the permutation). The dense branch and the two
output norms are submodules of the same block, so the layer's own ``pre_mlp_layernorm`` is the identity
on MoE layers and its ``post_mlp_layernorm`` is ``post_feedforward_layernorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import build_module

from gemma4.model.norms import rms_norm
from gemma4.model.numerics import compute_dtype


class Gemma4Router(MegatronModule):
    """``Gemma4TextRouter``: scaleless RMSNorm(r) · scale · H^-0.5 → linear → softmax (fp32; fp64 in fp64
    runs) → top-k → renormalise over the k → × ``per_expert_scale[idx]``.

    Returns Megatron's router interface: dense ``probs [T, E]`` (zero off the selected experts) and the
    boolean ``routing_map [T, E]``. Ties in top-k resolve exactly as HF's: the same ``torch.topk`` call on
    the same probability tensor. No auxiliary loss unless ``config.moe_aux_loss_coeff > 0`` (HF has none).
    """

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config)
        hidden, experts = config.hidden_size, config.num_moe_experts
        self.topk = config.moe_router_topk
        self.eps = config.layernorm_epsilon
        self.weight = torch.nn.Parameter(torch.empty(experts, hidden, dtype=config.params_dtype))
        self.scale = torch.nn.Parameter(torch.ones(hidden, dtype=config.params_dtype))
        self.per_expert_scale = torch.nn.Parameter(torch.ones(experts, dtype=config.params_dtype))
        torch.nn.init.normal_(self.weight, std=config.init_method_std)
        # Replicated over TP; under sequence parallelism every rank routes its own tokens, so the grads are
        # partial and Megatron's finalize_model_grads must all-reduce them (the attribute it looks for).
        for p in (self.weight, self.scale, self.per_expert_scale):
            p.sequence_parallel = config.sequence_parallel
        self.layer_number: int | None = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[T, H]`` -> (all probabilities ``[T, E]``, top-k weights ``[T, k]``, top-k indices ``[T, k]``)."""
        z = rms_norm(hidden, None, self.eps) * self.scale * hidden.shape[-1] ** -0.5
        scores = torch.nn.functional.linear(z, self.weight)
        probs = torch.softmax(scores, dim=-1, dtype=compute_dtype(hidden.dtype))
        top_w, top_i = torch.topk(probs, k=self.topk, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w * self.per_expert_scale[top_i]
        return probs, top_w, top_i

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``[s, b, H]`` (or ``[T, H]``) -> (probs ``[T, E]``, routing_map ``[T, E]``)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        probs, top_w, top_i = self.route(flat)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_i, True)
        dense = torch.zeros_like(probs, dtype=top_w.dtype).scatter(1, top_i, top_w)
        if self.config.moe_aux_loss_coeff > 0 and self.training:
            dense = self._attach_aux_loss(probs, routing_map, dense)
        return dense, routing_map

    def _attach_aux_loss(self, probs, routing_map, output):
        from megatron.core.transformer.moe.moe_utils import (
            MoEAuxLossAutoScaler,
            switch_load_balancing_loss_func,
        )

        tokens_per_expert = routing_map.sum(dim=0)
        aux = switch_load_balancing_loss_func(
            probs=probs,
            tokens_per_expert=tokens_per_expert,
            total_num_tokens=probs.shape[0],
            topk=self.topk,
            num_experts=probs.shape[1],
            moe_aux_loss_coeff=self.config.moe_aux_loss_coeff,
        )
        return MoEAuxLossAutoScaler.apply(output, aux)


class Gemma4MoELayer(MoELayer):
    """Megatron ``MoELayer`` + Gemma 4's dense branch and per-branch norms (see module docstring).

    Extra submodules (built here so the spec stays Megatron's ``MoESubmodules``): ``dense_mlp`` with
    ``pre_dense_layernorm`` / ``post_dense_layernorm``, and ``pre_experts_layernorm`` /
    ``post_experts_layernorm`` around the routed experts.
    """

    def __init__(
        self,
        config,
        submodules,
        layer_number: int | None = None,
        pg_collection=None,
        dense_mlp=None,
        norm=None,
    ) -> None:
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)

        def build_norm():
            return build_module(
                norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )

        self.pre_dense_layernorm = build_norm()
        self.dense_mlp = build_module(dense_mlp, config=config, tp_group=self.tp_group)
        self.post_dense_layernorm = build_norm()
        self.pre_experts_layernorm = build_norm()
        self.post_experts_layernorm = build_norm()

    def preprocess(self, hidden_states, probs, routing_map):
        # The experts' input norm (pre_feedforward_layernorm_2), applied before dispatch.
        return super().preprocess(self.pre_experts_layernorm(hidden_states).contiguous(), probs, routing_map)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        """Raw residual ``[s, b, H]`` -> (dense + routed branch output, None)."""
        dense, _ = self.dense_mlp(self.pre_dense_layernorm(hidden_states))
        routed, _ = super().forward(hidden_states, padding_mask=padding_mask)
        return self.post_dense_layernorm(dense) + self.post_experts_layernorm(routed), None

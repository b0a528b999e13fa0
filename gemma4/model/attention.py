"""Gemma 4 self-attention on Megatron-Core (``Gemma4TextAttention`` in HF, facts §2.3).

Per layer: ``q = RoPE(q_norm(Wq h))``; ``k = RoPE(k_norm(Wk h))``; ``v = v_norm(Wv h)`` where ``v_norm`` has
no weight, and on K=V full layers ``v = v_norm(Wk h)`` (the *raw* K projection, before ``k_norm`` and RoPE);
scores are scaled by 1.0 (the q/k norms replace 1/sqrt(d)); the core attention
(:mod:`gemma4.model.core_attention`) applies the causal / sliding-window / document mask.

``linear_qkv`` keeps Megatron's per-group interleaved layout ``[q heads of group g, k_g, v_g]``. On K=V
layers it has no V slot at all (``[q heads of g, k_g]``), so no parameter exists that HF does not have.

Tensor parallelism with fewer KV heads than TP ranks (e.g. one global KV head at TP 2) uses Megatron's own
scheme: each rank holds a contiguous slice of the packed rows, all-gathers the projection output, keeps its
KV group (replicated on ``tp / ng`` ranks) and its ``np / tp`` query heads.
"""

from __future__ import annotations

import torch
from megatron.core.parallel_state import get_tensor_model_parallel_rank
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from gemma4.config import SLIDING
from gemma4.model import rope
from gemma4.model.norms import rms_norm


class KEqVColumnParallelLinear(ColumnParallelLinear):
    """``linear_qkv`` for K=V layers: Megatron asks for ``(np + 2 ng) d`` rows; we allocate ``(np + ng) d``."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        kv_projection = config.kv_channels * config.num_query_groups
        super().__init__(input_size, output_size - kv_projection, config=config, **kwargs)


class QOnlyColumnParallelLinear(ColumnParallelLinear):
    """``linear_qkv`` of KV-shared (reuse) layers: only the query rows (their K/V come from the store layer)."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        kv_projection = config.kv_channels * config.num_query_groups
        super().__init__(input_size, output_size - 2 * kv_projection, config=config, **kwargs)


class Gemma4SelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` with Gemma 4's q/k/v norms, K=V and per-layer-type RoPE.

    Construction is Megatron's (``linear_qkv``, ``q_layernorm``/``k_layernorm``, ``core_attention``,
    ``linear_proj`` from the spec); ``forward`` is rewritten for the Gemma 4 order of operations. KV-cache
    inference is not implemented here (rollouts run in SGLang).
    """

    def __init__(self, config, submodules, layer_number: int, attn_mask_type=AttnMaskType.causal, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        spec = config.gemma4
        self.gemma4 = spec
        self.layer_type = config.layer_type
        self.k_eq_v = spec.attention_k_eq_v and self.layer_type != SLIDING
        self.reuses_kv = spec.reuses_kv(layer_number - 1)
        ng, tp = config.num_query_groups, self.world_size
        if (ng >= tp and ng % tp) or (ng < tp and tp % ng):
            raise ValueError(
                f"layer {layer_number - 1}: {ng} KV heads and tensor parallel size {tp}: one must divide the other"
            )

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        """``[s, b, h]`` -> q ``[s, b, np, d]``, k and v ``[s, b, ng, d]`` with Gemma 4's norms applied
        (k and v are None on KV-shared layers, which only project queries)."""
        mixed, _ = self.linear_qkv(hidden_states)
        d = self.hidden_size_per_attention_head
        if self.reuses_kv:  # Q rows only, split contiguously over TP like the query heads
            query = mixed.view(*mixed.shape[:2], -1, d)
            return self.q_layernorm(query), None, None
        ng_total = self.config.num_query_groups
        replicated = ng_total < self.world_size
        if replicated:  # fewer KV heads than ranks: gather, keep this rank's group
            mixed = all_gather_last_dim_from_tensor_parallel_region(mixed)
            ranks_per_group = self.world_size // ng_total
            group = get_tensor_model_parallel_rank() // ranks_per_group
            size = mixed.shape[-1] // ng_total
            mixed = mixed[..., group * size : (group + 1) * size]
        ng = self.num_query_groups_per_partition
        q_per_group = self.num_attention_heads_per_partition // ng
        slots = q_per_group + (1 if self.k_eq_v else 2)
        mixed = mixed.view(*mixed.shape[:-1], ng, slots * d)
        query = mixed[..., : q_per_group * d].reshape(*mixed.shape[:2], ng * q_per_group, d)
        raw_key = mixed[..., q_per_group * d : (q_per_group + 1) * d]
        raw_value = raw_key if self.k_eq_v else mixed[..., (q_per_group + 1) * d :]
        if replicated:  # this rank's np / tp query heads of the group
            heads = self.num_attention_heads_per_partition // ranks_per_group
            part = get_tensor_model_parallel_rank() % ranks_per_group
            query = query[:, :, part * heads : (part + 1) * heads]

        query = self.q_layernorm(query)
        key = self.k_layernorm(raw_key)
        value = rms_norm(raw_value, None, self.config.layernorm_epsilon)  # v_norm: no weight
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb: torch.Tensor | None = None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
        shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
        **kwargs,
    ):
        """``[s, b, h]`` -> (``[s, b, h]``, bias), plus the layer's (K, V) when ``return_kv``.

        ``rotary_pos_emb`` holds the packed RoPE angles. KV-shared layers take ``shared_kv``: the store
        layer's K after k_norm and RoPE and its v-normed V (HF ``shared_kv_states``), and apply their own
        RoPE to the queries only.
        """
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("Gemma4SelfAttention: KV-cache inference is not implemented")
        if rotary_pos_emb is None:
            raise ValueError("Gemma4SelfAttention needs the RoPE angles from Gemma4Model (rotary_pos_emb)")
        query, key, value = self.get_query_key_value_tensors(hidden_states)

        angles = rope.angles_for(self.gemma4, rotary_pos_emb, self.layer_type)
        cos, sin = rope.cos_sin(angles, query.dtype)
        query = rope.apply_rotary(query, cos, sin)
        if self.reuses_kv:
            if shared_kv is None:
                raise ValueError("a KV-shared layer needs the store layer's K/V (shared_kv)")
            key, value = shared_kv
        else:
            key = rope.apply_rotary(key, cos, sin)

        core = self.core_attention(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=self.attn_mask_type,
            packed_seq_params=packed_seq_params,
        )
        out, bias = self.linear_proj(core)
        return (out, bias, (key, value)) if return_kv else (out, bias)

"""Gemma 4 self-attention on Megatron-Core (``Gemma4TextAttention`` in HF, facts §2.3).

Per layer: ``q = RoPE(q_norm(Wq h))``; ``k = RoPE(k_norm(Wk h))``; ``v = v_norm(Wv h)`` where ``v_norm`` has
no weight, and on K=V full layers ``v = v_norm(Wk h)`` (the *raw* K projection, before ``k_norm`` and RoPE);
scores are scaled by 1.0 (the q/k norms replace 1/sqrt(d)); sliding layers see keys ``i - W < j <= i``.

``linear_qkv`` keeps Megatron's per-group interleaved layout ``[q heads of group g, k_g, v_g]``. On K=V
layers it has no V slot at all (``[q heads of g, k_g]``), so no parameter exists that HF does not have.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from gemma4.config import SLIDING
from gemma4.model import rope
from gemma4.model.norms import rms_norm
from gemma4.model.numerics import compute_dtype


class KEqVColumnParallelLinear(ColumnParallelLinear):
    """``linear_qkv`` for K=V layers: Megatron asks for ``(np + 2 ng) d`` rows; we allocate ``(np + ng) d``."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        kv_projection = config.kv_channels * config.num_query_groups
        super().__init__(input_size, output_size - kv_projection, config=config, **kwargs)


def sliding_window_mask(
    sq: int, sk: int, window: int | None, device: torch.device, q_offset: int = 0
) -> torch.Tensor:
    """Boolean ``[sq, sk]`` mask, True where query ``i`` may attend key ``j``.

    Causal, plus ``i - j < window`` on sliding layers (HF ``sliding_window_overlay``: the window counts the
    query itself, so W = 3 lets a token see itself and two predecessors; Megatron/TE write this as
    ``window_size = (W - 1, 0)``).
    """
    i = torch.arange(sq, device=device)[:, None] + q_offset
    j = torch.arange(sk, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


class Gemma4CoreAttention(MegatronModule):
    """Eager attention with HF's numerics: ``softmax(q k^T * scale + mask)`` in fp32 (fp64 for fp64 runs).

    Has ``DotProductAttention``'s constructor and forward signature, so it plugs into the
    ``core_attention`` slot of a layer spec. ``sliding_window`` is set per layer through the spec.
    Memory is O(s^2) per head: this is the reference path for the CPU gate.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("Gemma4CoreAttention: context parallelism is not supported yet")
        self.layer_number = layer_number
        self.sliding_window = sliding_window
        self.softmax_scale = 1.0 if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """q ``[sq, b, np, d]``, k/v ``[sk, b, ng, d]`` -> ``[sq, b, np * d]``.

        ``attention_mask`` (optional) is Megatron's boolean mask, True where a position is *masked*,
        broadcastable to ``[b, np, sq, sk]``; it is combined with the causal/sliding mask.
        """
        if packed_seq_params is not None:
            raise NotImplementedError("Gemma4CoreAttention: packed sequences are not supported yet")
        sq, b, np_, d = query.shape
        sk, _, ng, _ = key.shape
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, d]
        # HF repeat_kv: query head h uses KV head h // (np / ng).
        k = key.permute(1, 2, 0, 3).repeat_interleave(np_ // ng, dim=1)
        v = value.permute(1, 2, 0, 3).repeat_interleave(np_ // ng, dim=1)

        scores = torch.matmul(q, k.transpose(2, 3)) * self.softmax_scale
        allowed = sliding_window_mask(sq, sk, self.sliding_window, query.device)
        if attention_mask is not None:
            allowed = allowed & ~attention_mask
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=compute_dtype(query.dtype)).to(query.dtype)
        if self.training and self.dropout_p > 0:
            probs = torch.nn.functional.dropout(probs, p=self.dropout_p)
        out = torch.matmul(probs, v)  # [b, np, sq, d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * d)


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
        if self.num_query_groups_per_partition * self.world_size != config.num_query_groups:
            raise NotImplementedError(
                f"layer {layer_number}: {config.num_query_groups} KV heads cannot be split over "
                f"tensor parallel size {self.world_size} (KV-head replication is not supported yet)"
            )

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        """``[s, b, h]`` -> q ``[s, b, np, d]``, k and v ``[s, b, ng, d]`` with Gemma 4's norms applied."""
        mixed, _ = self.linear_qkv(hidden_states)
        d = self.hidden_size_per_attention_head
        ng = self.num_query_groups_per_partition
        q_per_group = self.num_attention_heads_per_partition // ng
        slots = q_per_group + (1 if self.k_eq_v else 2)
        mixed = mixed.view(*mixed.shape[:-1], ng, slots * d)
        query = mixed[..., : q_per_group * d].reshape(*mixed.shape[:2], ng * q_per_group, d)
        raw_key = mixed[..., q_per_group * d : (q_per_group + 1) * d]
        raw_value = raw_key if self.k_eq_v else mixed[..., (q_per_group + 1) * d :]

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
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, h]`` -> (``[s, b, h]``, bias). ``rotary_pos_emb`` holds the packed RoPE angles."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("Gemma4SelfAttention: KV-cache inference is not implemented")
        if rotary_pos_emb is None:
            raise ValueError("Gemma4SelfAttention needs the RoPE angles from Gemma4Model (rotary_pos_emb)")
        query, key, value = self.get_query_key_value_tensors(hidden_states)

        angles = rope.angles_for(self.gemma4, rotary_pos_emb, self.layer_type)
        cos, sin = rope.cos_sin(angles, query.dtype)
        query = rope.apply_rotary(query, cos, sin)
        key = rope.apply_rotary(key, cos, sin)

        core = self.core_attention(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=self.attn_mask_type,
            packed_seq_params=packed_seq_params,
        )
        return self.linear_proj(core)

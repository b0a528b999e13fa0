"""Gemma 4 core attention: one mask definition, three execution paths, context parallelism.

Mask (:func:`allowed_mask`, the only place the rule lives): query i may attend key j iff same document,
``pos(j) <= pos(i)``, and on sliding layers ``pos(i) - pos(j) < W``.

Paths (``Gemma4TransformerConfig.gemma4_attention_backend``; ``auto`` picks per call):

* ``dense``: eager ``softmax(q k^T + mask)`` with HF's numerics (scores in the activation dtype, softmax in
  fp32, fp64 for fp64 runs). O(s^2) memory. The reference path; ``auto`` uses it for short sequences
  (<= ``DENSE_MAX_KEYS`` keys) and for full-attention layers.
* ``blockwise``: sliding layers only. Queries in blocks of ``BLOCK`` consecutive tokens, each against just
  the keys its window can reach, so memory is O(s · (BLOCK + W)): linear in s, at any head dim (512 too).
  ``auto`` uses it for sliding layers with more than ``DENSE_MAX_KEYS`` keys.
* ``flash``: ``flash_attn_varlen_func`` with ``window_size=(W - 1, 0)`` and ``cu_seqlens`` (documents),
  on CUDA for head dim <= 256, bf16/fp16, without context parallelism, when ``flash_attn`` is installed.
  ``auto`` prefers it there. Exercised by ``tox -e gpu-parity``, not by the CPU gate.

Context parallelism: K and V are all-gathered over the CP group (differentiable: the backward
reduce-scatters) and put in global token order; queries stay local. Windows and positions come from the
layout, so they stay right across chunk boundaries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from gemma4.model.numerics import compute_dtype
from gemma4.model.sequence_layout import Gemma4SeqLayout, make_layout

DENSE_MAX_KEYS = 2048
BLOCK = 256


def allowed_mask(
    q_doc: torch.Tensor, q_pos: torch.Tensor, k_doc: torch.Tensor, k_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean ``[sq, sk]``: True where the query may attend the key (see module docstring)."""
    qd, qp = q_doc[:, None], q_pos[:, None]
    kd, kp = k_doc[None, :], k_pos[None, :]
    allowed = (qd == kd) & (kp <= qp)
    if window is not None:
        allowed = allowed & (qp - kp < window)
    return allowed


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """HF eager numerics. q ``[b, np, sq, d]``, k/v ``[b, np, sk, d]``, allowed broadcastable to the scores."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=compute_dtype(q.dtype)).to(q.dtype)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _runs(index: torch.Tensor, block: int) -> list[tuple[int, int]]:
    """Split local positions into blocks of <= ``block`` with consecutive global indices."""
    idx = index.tolist()
    out, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1 or i - start == block:
            out.append((start, i))
            start = i
    return out


def blockwise_sliding_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Gemma4SeqLayout,
    window: int,
    scale: float,
    block: int = BLOCK,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Sliding-window attention in query blocks; keys are in global order, queries local (CP chunks)."""
    outs = []
    for a, b in _runs(layout.q_index, block):
        g0 = int(layout.q_index[a])
        g1 = int(layout.q_index[b - 1])
        lo, hi = max(0, g0 - window + 1), g1 + 1
        allowed = allowed_mask(
            layout.q_doc[a:b], layout.q_pos[a:b], layout.k_doc[lo:hi], layout.k_pos[lo:hi], window
        )
        outs.append(eager_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], allowed, scale, dropout_p))
    return torch.cat(outs, dim=2)


def flash_available() -> bool:
    """True when ``flash_attn`` with varlen support imports (GPU machines only)."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken build: not available
        return False
    return True


def flash_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Gemma4SeqLayout,
    window: int | None,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``[s, b, np|ng, d]`` inputs; every batch row (or packed document) is one varlen sequence."""
    from flash_attn import flash_attn_varlen_func

    s, b, np_, d = query.shape
    ng = key.shape[2]
    if layout.packed:
        starts = torch.nonzero(layout.k_pos == 0).flatten()
        cu = torch.cat([starts, torch.tensor([s], device=starts.device)]).to(torch.int32)
    else:
        cu = torch.arange(0, (b + 1) * s, s, device=query.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    q = query.transpose(0, 1).reshape(b * s, np_, d)
    k = key.transpose(0, 1).reshape(b * s, ng, d)
    v = value.transpose(0, 1).reshape(b * s, ng, d)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max_len,
        max_len,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
    )
    return out.reshape(b, s, np_ * d).transpose(0, 1)


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward reduce-scatters (sums every rank's use of our K/V)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, layout: Gemma4SeqLayout) -> torch.Tensor:
    """CP: every rank's local tokens of ``x`` (``[s_local, ...]``) in global token order."""
    gathered = _AllGatherSequence.apply(x, layout.cp_group)
    return gathered.index_select(0, layout.gather_order.to(x.device))


def select_backend(
    requested: str,
    *,
    sliding: bool,
    keys: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    cp_size: int,
) -> str:
    """The execution path ``auto`` resolves to (see module docstring)."""
    if requested != "auto":
        if requested == "blockwise" and not sliding:
            return "dense"
        return requested
    if (
        device.type == "cuda"
        and head_dim <= 256
        and dtype in (torch.bfloat16, torch.float16)
        and cp_size == 1
        and flash_available()
    ):
        return "flash"
    if sliding and keys > DENSE_MAX_KEYS:
        return "blockwise"
    return "dense"


class Gemma4CoreAttention(MegatronModule):
    """``DotProductAttention``-compatible core attention for Gemma 4 (see module docstring).

    ``sliding_window`` is set per layer through the spec (None on full-attention layers).
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
        self.layer_number = layer_number
        self.sliding_window = sliding_window
        self.softmax_scale = 1.0 if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend = getattr(config, "gemma4_attention_backend", "auto")
        self.last_backend: str | None = None

    def _layout(self, query: torch.Tensor, packed_seq_params) -> Gemma4SeqLayout:
        if isinstance(packed_seq_params, Gemma4SeqLayout):
            return packed_seq_params
        if self.config.context_parallel_size > 1:
            raise ValueError("context parallelism needs the Gemma4SeqLayout that Gemma4Model passes")
        cu = None
        if isinstance(packed_seq_params, PackedSeqParams) and packed_seq_params.cu_seqlens_q is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        return make_layout(query.shape[0], cu_seqlens=cu, device=query.device)

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
        """q ``[sq, b, np, d]``, k/v ``[sq, b, ng, d]`` (local tokens) -> ``[sq, b, np * d]``.

        ``attention_mask`` (optional) is Megatron's boolean mask, True where *masked*, broadcastable to
        ``[b, np, sq, sk]``; it is combined with the layout mask (dense path only).
        """
        layout = self._layout(query, packed_seq_params)
        if layout.cp_size > 1:
            key = gather_sequence(key, layout)
            value = gather_sequence(value, layout)
        dropout = self.dropout_p if self.training else 0.0
        backend = select_backend(
            self.backend,
            sliding=self.sliding_window is not None,
            keys=key.shape[0],
            head_dim=query.shape[-1],
            dtype=query.dtype,
            device=query.device,
            cp_size=layout.cp_size,
        )
        if attention_mask is not None and backend != "dense":
            backend = "dense"
        self.last_backend = backend
        return attend(
            query,
            key,
            value,
            layout,
            self.sliding_window,
            backend=backend,
            scale=self.softmax_scale,
            dropout_p=dropout,
            attention_mask=attention_mask,
        )


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Gemma4SeqLayout,
    window: int | None,
    *,
    backend: str = "dense",
    scale: float = 1.0,
    dropout_p: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """Attention of local queries ``[sq, b, np, d]`` over keys/values ``[sk, b, ng, d]`` in global order
    (already gathered under CP) -> ``[sq, b, np * d]``, on the given path."""
    if backend == "flash":
        return flash_varlen_attention(query, key, value, layout, window, scale, dropout_p)
    sq, b, np_, d = query.shape
    ng = key.shape[2]
    q = query.permute(1, 2, 0, 3)  # [b, np, sq, d]
    # HF repeat_kv: query head h uses KV head h // (np / ng).
    k = key.permute(1, 2, 0, 3).repeat_interleave(np_ // ng, dim=1)
    v = value.permute(1, 2, 0, 3).repeat_interleave(np_ // ng, dim=1)
    if backend == "blockwise" and window is not None:
        out = blockwise_sliding_attention(q, k, v, layout, window, scale, block=block, dropout_p=dropout_p)
    else:
        allowed = allowed_mask(layout.q_doc, layout.q_pos, layout.k_doc, layout.k_pos, window)
        if attention_mask is not None:
            allowed = allowed & ~attention_mask
        out = eager_attention(q, k, v, allowed, scale, dropout_p)
    return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * d)

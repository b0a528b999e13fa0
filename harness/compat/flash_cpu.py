"""A CPU stand-in for flash-attn's ``flash_attn_varlen_func``, in plain torch.

Same call signature (the subset Megatron implementations use): ``q, k, v`` in THD layout
(``[total_tokens, heads, head_dim]``), ``cu_seqlens_q/k`` (int32 document boundaries), ``max_seqlen_q/k``,
``dropout_p`` (only 0.0), ``softmax_scale`` (default ``head_dim**-0.5``), ``causal``, ``window_size=(left,
right)`` (``-1`` = unbounded), ``softcap`` (0 = off), ``alibi_slopes`` (only None) and
``return_attn_probs`` (only False). GQA/MQA: query head ``h`` reads KV head ``h // (hq // hk)``.

Semantics are flash-attn's (2.x, documented in ``flash_attn_interface.py``): each document is attended
separately; with ``seqlen_q != seqlen_k`` the causal mask is aligned to the bottom right, so query ``i``
of a document sees key ``j`` iff ``i + sk - sq - left <= j <= i + sk - sq + right`` (``right = 0`` under
``causal``). A query row that sees no key yields zeros (flash-attn's convention). Scores, softmax and the
weighted sum are computed in fp64 for fp64 inputs and in fp32 otherwise; the output has ``q``'s dtype.
"""

from __future__ import annotations

import torch


def window_mask(sq: int, sk: int, *, causal: bool, window_size: tuple[int, int], device=None) -> torch.Tensor:
    """``[sq, sk]`` bool, True where query ``i`` may see key ``j`` (flash-attn's rule, bottom-right aligned)."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    return allowed


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    if dropout_p:
        raise NotImplementedError("flash_cpu: dropout_p > 0 is not supported (run in eval mode)")
    if alibi_slopes is not None or block_table is not None or return_attn_probs:
        raise NotImplementedError(
            "flash_cpu: alibi_slopes, block_table and return_attn_probs are not supported"
        )
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"flash_cpu: q/k/v must be THD [tokens, heads, dim], got {q.shape}, {k.shape}, {v.shape}"
        )
    hq, hk = q.shape[1], k.shape[1]
    if hq % hk:
        raise ValueError(f"flash_cpu: {hq} query heads are not a multiple of {hk} KV heads")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError("flash_cpu: cu_seqlens_q and cu_seqlens_k hold different numbers of documents")
    out = torch.zeros(q.shape[0], hq, v.shape[-1], dtype=q.dtype, device=q.device)
    for d in range(len(cq) - 1):
        qs, qe, ks, ke = cq[d], cq[d + 1], ck[d], ck[d + 1]
        sq, sk = qe - qs, ke - ks
        if sq == 0 or sk == 0:
            continue
        qd = q[qs:qe].to(work).transpose(0, 1)  # [hq, sq, d]
        kd = k[ks:ke].to(work).repeat_interleave(hq // hk, dim=1).transpose(0, 1)
        vd = v[ks:ke].to(work).repeat_interleave(hq // hk, dim=1).transpose(0, 1)
        scores = torch.matmul(qd, kd.transpose(-1, -2)) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        allowed = window_mask(sq, sk, causal=causal, window_size=window_size, device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows that see no key: zeros, as flash-attn returns
        out[qs:qe] = torch.matmul(probs, vd).transpose(0, 1).to(q.dtype)
    return out


def flash_attn_module():
    """A ``flash_attn`` module object exposing :func:`flash_attn_varlen_func` (for ``sys.modules``)."""
    import types

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    mod.__version__ = "2.8.3+harness.cpu"
    mod.__harness_stand_in__ = True
    return mod

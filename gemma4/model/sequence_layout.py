"""Where each local token sits: document, position in its document, global index; CP zig-zag sharding.

Every attention path derives its mask from this one description, so the window semantics cannot differ
between paths: query ``i`` may attend key ``j`` iff they are in the same document, ``pos(j) <= pos(i)``, and
on sliding layers ``pos(i) - pos(j) < W`` (HF: the window counts the query itself).

Context parallelism follows Megatron/TE's load-balanced zig-zag: each sequence (each document of a packed
row) is cut into ``2·cp`` equal chunks and rank ``r`` holds chunks ``r`` and ``2·cp − 1 − r``, in that order.
Sequences must therefore have a length divisible by ``2·cp`` (Megatron pads them: ``cu_seqlens_*_padded``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from gemma4.errors import InvalidInputError


def zigzag_chunks(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices (within one sequence of ``length``) held by ``cp_rank``: chunks r and 2cp-1-r."""
    if cp_size == 1:
        return torch.arange(length)
    if length % (2 * cp_size):
        raise InvalidInputError(
            f"sequence length {length} must be divisible by 2*cp = {2 * cp_size} for context parallelism"
        )
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def local_token_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token indices of rank ``cp_rank``'s tokens, document by document (ascending)."""
    cu = [int(x) for x in cu_seqlens]
    parts = [start + zigzag_chunks(end - start, cp_size, cp_rank) for start, end in zip(cu[:-1], cu[1:])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def shard_for_cp(
    x: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1
) -> torch.Tensor:
    """This rank's part of ``x`` (global token order along ``dim``), as Megatron/slime shard the batch."""
    idx = local_token_indices(cu_seqlens, cp_size, cp_rank).to(x.device)
    return x.index_select(dim, idx)


def unshard_from_cp(parts: list[torch.Tensor], cu_seqlens: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_for_cp` given every rank's part (rank order)."""
    cp = len(parts)
    order = torch.cat([local_token_indices(cu_seqlens, cp, r) for r in range(cp)])
    gathered = torch.cat(parts, dim=dim)
    return gathered.index_select(dim, torch.argsort(order).to(gathered.device))


@dataclass
class Gemma4SeqLayout(PackedSeqParams):
    """Megatron's ``PackedSeqParams`` plus the per-token layout Gemma 4 attention masks are built from.

    Token tensors are 1-D and shared by all batch rows: ``q_*`` over this rank's local tokens, ``k_*`` over
    the whole sequence in global order (the keys every rank sees after the CP all-gather).
    ``gather_order`` maps the all-gathered keys (rank-major) to global order.
    """

    q_index: torch.Tensor | None = None
    q_doc: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    gather_order: torch.Tensor | None = None
    cp_size: int = 1
    packed: bool = False


def make_layout(
    local_len: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    cp_size: int = 1,
    cp_rank: int = 0,
    cp_group=None,
    device: torch.device | str = "cpu",
    base: PackedSeqParams | None = None,
) -> Gemma4SeqLayout:
    """Layout of a rank's ``local_len`` tokens. ``cu_seqlens`` (global, padded) describes packed documents;
    None means one document per batch row."""
    total = local_len * cp_size
    packed = cu_seqlens is not None
    cu = cu_seqlens.to("cpu", torch.long) if packed else torch.tensor([0, total])
    if int(cu[-1]) != total:
        raise InvalidInputError(
            f"cu_seqlens ends at {int(cu[-1])} but the sequence holds {total} tokens ({local_len} x cp {cp_size})"
        )
    if bool((cu[1:] < cu[:-1]).any()):
        raise InvalidInputError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    all_idx = torch.arange(total)
    doc = torch.searchsorted(cu, all_idx, right=True) - 1
    pos = all_idx - cu[doc]
    q_index = local_token_indices(cu, cp_size, cp_rank)
    gathered = torch.cat([local_token_indices(cu, cp_size, r) for r in range(cp_size)])
    fields = {}
    if base is not None:
        fields = {f: getattr(base, f) for f in PackedSeqParams.__dataclass_fields__}
    fields["cp_group"] = cp_group if cp_group is not None else fields.get("cp_group")
    dev = torch.device(device)
    return Gemma4SeqLayout(
        **fields,
        q_index=q_index.to(dev),
        q_doc=doc[q_index].to(dev),
        q_pos=pos[q_index].to(dev),
        k_doc=doc.to(dev),
        k_pos=pos.to(dev),
        gather_order=torch.argsort(gathered).to(dev),
        cp_size=cp_size,
        packed=packed,
    )

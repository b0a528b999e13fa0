"""Tensor- and expert-parallel placement driven by Megatron's own parameter metadata, and the TP split rule.

Megatron marks every sharded parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride`` and initialises rank r's shard as ``split(full, per_partition / stride)[r::tp]``
(``_initialize_affine_weight_cpu``). :func:`tp_shard` / :func:`tp_join` are that rule, the only place it
lives: :func:`shard_like` / :func:`gather_like` apply it with a live parameter's metadata (training, parity,
weight sync), :mod:`gemma4.conversion.sharding` with the ``(dim, stride)`` each layout of the mapping table
stands for (checkpoint tensors, no model). A full (TP = 1 layout) tensor is thus cut exactly the way the layer
expects, including GLU ``linear_fc1`` (stride 2: rank r holds ``[gate_r; up_r]``) and K=V ``linear_qkv`` rows
with fewer KV groups than ranks. Under expert parallelism EP rank r holds the global experts
``[r·E/ep, (r+1)·E/ep)`` as ``local_experts.0 ..`` (Megatron's placement,
:func:`gemma4.conversion.mapping.expert_placement`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from gemma4.conversion.mapping import global_expert_index, load_strict, model_tensors
from gemma4.errors import InvalidInputError


def tp_shard(
    full: torch.Tensor, tp: int, rank: int, dim: int, stride: int = 1, what: str = "tensor"
) -> torch.Tensor:
    """TP rank ``rank``'s shard of ``full``: ``full`` split along ``dim`` into ``tp · stride`` equal pieces,
    the rank holding pieces ``rank, rank + tp, ..`` concatenated (stride 1: the rank-th contiguous chunk, a
    view; stride 2, GLU ``linear_fc1``: ``[gate_rank; up_rank]``)."""
    size = full.shape[dim]
    if size % (tp * stride):
        by = f" x stride {stride}" if stride > 1 else ""
        raise InvalidInputError(f"{what}: dim {dim} of size {size} cannot be split over {tp} ranks{by}")
    pieces = torch.split(full, size // (tp * stride), dim=dim)
    mine = pieces[rank::tp]
    return mine[0] if stride == 1 else torch.cat(mine, dim=dim)


def tp_split(
    full: torch.Tensor, tp: int, dim: int, stride: int = 1, what: str = "tensor"
) -> list[torch.Tensor]:
    """Every TP rank's shard of ``full`` (:func:`tp_shard`), in rank order."""
    return [tp_shard(full, tp, rank, dim, stride, what) for rank in range(tp)]


def tp_join(shards: Sequence[torch.Tensor], dim: int, stride: int = 1, what: str = "tensor") -> torch.Tensor:
    """The inverse of :func:`tp_split`: each shard is cut into ``stride`` pieces along ``dim`` and the pieces
    re-interleaved, not just concatenated (GLU: ``[gate_0; up_0], [gate_1; up_1]`` ->
    ``[gate_0; gate_1; up_0; up_1]``)."""
    if stride == 1:
        return torch.cat(list(shards), dim=dim)
    size = shards[0].shape[dim]
    if size % stride:
        raise InvalidInputError(f"{what}: dim {dim} of size {size} is not divisible by stride {stride}")
    pieces = [torch.split(shard, size // stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][j] for j in range(stride) for rank in range(len(shards))], dim=dim)


def shard_like(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of ``full`` for ``param`` (replicated parameters get ``full`` back)."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    per_piece = param.shape[dim] // stride
    if full.shape[dim] != per_piece * stride * tp_size:
        raise InvalidInputError(
            f"cannot shard a tensor of shape {tuple(full.shape)} into {tp_size} x stride {stride} pieces "
            f"of {per_piece} along dim {dim}"
        )
    return tp_shard(full, tp_size, tp_rank, dim, stride)


def gather_like(shards: Sequence[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The full tensor from every TP rank's shard of ``param`` (``shards`` in TP-rank order): the inverse
    of :func:`shard_like`. Rank r holds pieces ``r, r + tp, r + 2·tp, ..`` of ``full`` split into
    ``tp · stride`` pieces along ``partition_dim``, so the pieces are re-interleaved, not just concatenated
    (GLU ``linear_fc1``: ``[gate_0; up_0], [gate_1; up_1]`` -> ``[gate_0; gate_1; up_0; up_1]``).
    Replicated parameters (and TP = 1) give rank 0's tensor back."""
    if not shards:
        raise InvalidInputError("gather_like: no shards given")
    tp_size = len(shards)
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    dim, stride = param.partition_dim, param.partition_stride
    for rank, shard in enumerate(shards):
        if tuple(shard.shape) != tuple(param.shape):
            raise InvalidInputError(
                f"gather_like: shard of TP rank {rank} has shape {tuple(shard.shape)}, the parameter's is "
                f"{tuple(param.shape)}"
            )
    return tp_join(shards, dim, stride, "gather_like")


_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")


def global_expert_name(name: str, ep_rank: int, ep_size: int, num_experts: int) -> str:
    """``...local_experts.{i}...`` on EP rank r -> the global expert ``r * E/ep + i`` (TP = 1 names;
    :func:`gemma4.conversion.mapping.global_expert_index`)."""
    if ep_size == 1:
        return name
    return _LOCAL_EXPERT.sub(
        lambda m: (
            f"{m.group(1)}{global_expert_index(ep_rank, int(m.group(2)), num_experts, ep_size)}{m.group(3)}"
        ),
        name,
    )


def load_full_state_dict(
    model: torch.nn.Module,
    full: Mapping[str, torch.Tensor],
    tp_rank: int,
    tp_size: int,
    ep_rank: int = 0,
    ep_size: int = 1,
) -> None:
    """Load TP = 1 / EP = 1 layout tensors (Megatron names, global expert indices) into a possibly TP- and
    EP-sharded model; every tensor of the model must be covered, and nothing else may be given (experts
    that live on other EP ranks excepted). The strict copy is :func:`gemma4.conversion.mapping.load_strict`;
    here each tensor is first cut for this rank (:func:`shard_like`)."""
    num_experts = getattr(model.config, "num_moe_experts", None) or 1
    params = {global_expert_name(k, ep_rank, ep_size, num_experts): v for k, v in model.named_parameters()}
    own = {global_expert_name(k, ep_rank, ep_size, num_experts): v for k, v in model_tensors(model).items()}

    def on_another_ep_rank(name: str) -> bool:
        return ep_size > 1 and _LOCAL_EXPERT.search(name) is not None

    def cut(name: str, full_tensor: torch.Tensor) -> torch.Tensor:
        return shard_like(full_tensor, params[name], tp_rank, tp_size) if name in params else full_tensor

    load_strict(own, full, "weights", optional=on_another_ep_rank, prepare=cut)

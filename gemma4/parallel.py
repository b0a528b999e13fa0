"""Tensor-parallel sharding driven by Megatron's own parameter metadata.

Megatron marks every sharded parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride`` and initialises rank r's shard as ``split(full, per_partition / stride)[r::tp]``
(``_initialize_affine_weight_cpu``). Using the same rule here means a full (TP = 1 layout) tensor is cut
exactly the way the layer expects, including GLU ``linear_fc1`` (stride 2: rank r holds ``[gate_r; up_r]``)
and K=V ``linear_qkv`` rows with fewer KV groups than ranks. Under expert parallelism EP rank r holds the
global experts ``[r·E/ep, (r+1)·E/ep)`` as ``local_experts.0 ..`` (Megatron's placement).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from gemma4.errors import InvalidInputError


def shard_like(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of ``full`` for ``param`` (replicated parameters get ``full`` back)."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    per_piece = param.shape[dim] // stride
    pieces = torch.split(full, per_piece, dim=dim)
    if len(pieces) != tp_size * stride:
        raise InvalidInputError(
            f"cannot shard a tensor of shape {tuple(full.shape)} into {tp_size} x stride {stride} pieces "
            f"of {per_piece} along dim {dim}"
        )
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


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
    if param.shape[dim] % stride:
        raise InvalidInputError(
            f"gather_like: dim {dim} of size {param.shape[dim]} is not divisible by stride {stride}"
        )
    per_piece = param.shape[dim] // stride
    pieces = [torch.split(shard, per_piece, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][j] for j in range(stride) for rank in range(tp_size)], dim=dim)


_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")


def global_expert_name(name: str, ep_rank: int, ep_size: int, num_experts: int) -> str:
    """``...local_experts.{i}...`` on EP rank r -> the global expert ``r * E/ep + i`` (TP = 1 names)."""
    if ep_size == 1:
        return name
    per_rank = num_experts // ep_size
    return _LOCAL_EXPERT.sub(
        lambda m: f"{m.group(1)}{ep_rank * per_rank + int(m.group(2))}{m.group(3)}", name
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
    that live on other EP ranks excepted)."""
    num_experts = getattr(model.config, "num_moe_experts", None) or 1
    params = {global_expert_name(k, ep_rank, ep_size, num_experts): v for k, v in model.named_parameters()}
    own = {
        global_expert_name(k, ep_rank, ep_size, num_experts): v
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state")
    }
    given = {k for k in full if ep_size == 1 or k in own or not _LOCAL_EXPERT.search(k)}
    missing = sorted(set(own) - given)
    extra = sorted(given - set(own))
    if missing or extra:
        raise InvalidInputError(f"weights do not cover the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, target in own.items():
            src = full[name]
            if name in params:
                src = shard_like(src, params[name], tp_rank, tp_size)
            if tuple(src.shape) != tuple(target.shape):
                raise InvalidInputError(
                    f"tensor {name!r}: weights give shape {tuple(src.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(src.to(target.dtype))

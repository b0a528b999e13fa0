"""Tensor-parallel sharding driven by Megatron's own parameter metadata.

Megatron marks every sharded parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride`` and initialises rank r's shard as ``split(full, per_partition / stride)[r::tp]``
(``_initialize_affine_weight_cpu``). Using the same rule here means a full (TP = 1 layout) tensor is cut
exactly the way the layer expects, including GLU ``linear_fc1`` (stride 2: rank r holds ``[gate_r; up_r]``)
and K=V ``linear_qkv`` rows with fewer KV groups than ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def load_full_state_dict(
    model: torch.nn.Module, full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int
) -> None:
    """Load TP = 1 layout tensors (Megatron names) into a possibly TP-sharded model; all must be covered."""
    params = dict(model.named_parameters())
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(full))
    extra = sorted(set(full) - set(own))
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

"""Megatron -> rollout-engine weight sync, fed to the streaming converter the way slime feeds it.

slime (``update_weight_utils``) walks the trainer's parameters in order, all-gathers each one across
tensor parallelism (and, for experts, across expert parallelism; SequentialMLP experts renamed to TE's
grouped form with their global index by :func:`gemma4.slime.weight_sync.slime_global_expert_name`, as
``with_global_expert_names`` does inside slime, whose own rule keeps them rank-local), collects the gathered tensors into buckets of ``update_weight_buffer_size`` bytes, converts each
bucket with ``convert_<model>_to_hf(args, name, param)`` (names as the wrapped model gives them:
``module.module.decoder.layers.{L}...``) and pushes the HF tensors to the engine.

Here every rank takes part in the gathers; rank 0 (which holds the engine) buckets, converts and loads
(through SGLang's own ``load_weights`` when it is importable: :mod:`harness.e2e.sglang_route`).
The walk covers parameters and persistent buffers (``layer_scalar``), so the engine's starting weights
matter nowhere. Nothing else ever writes the engine's weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from gemma4.parallel import gather_like
from gemma4.slime.weight_sync import convert_gemma4_to_hf, slime_global_expert_name

WRAPPER_PREFIX = "module.module."  # DDP(Float16Module(model)), as slime's names arrive
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.\d+\.")


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def iter_global_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(global Megatron name, full tensor)`` for every parameter and persistent buffer, in model order.

    Collective: every rank must call it and consume it to the end. TP shards are gathered with
    :func:`gemma4.parallel.gather_like` (partition dim and stride); under EP each local expert is
    all-gathered over the expert-parallel group and yielded once per EP rank under its global index.
    """
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    etp = ps.get_expert_tensor_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    num_experts = getattr(model.config, "num_moe_experts", None) or 1
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state"):
                continue
            t = param.detach()
            is_expert = _EXPERT.search(name) is not None
            sharded = getattr(param, "tensor_model_parallel", False)
            if is_expert:
                if sharded and etp > 1:
                    t = gather_like(_all_gather(t, ps.get_expert_tensor_parallel_group()), param)
                if ep > 1:
                    for ep_rank, full in enumerate(_all_gather(t, ps.get_expert_model_parallel_group())):
                        yield slime_global_expert_name(name, ep_rank, ep, num_experts), full
                    continue
            elif sharded and tp > 1:
                t = gather_like(_all_gather(t, ps.get_tensor_model_parallel_group()), param)
            yield name, t


def sync_weights(
    model: torch.nn.Module, engine: Any | None, args: Any, bucket_bytes: int, index: int
) -> Any | None:
    """Push ``model``'s weights into ``engine`` (rank 0; ``None`` elsewhere) in buckets through
    ``convert_gemma4_to_hf``. Collective. Returns the engine's :class:`SyncRecord` on rank 0."""
    from megatron.core import parallel_state as ps

    if getattr(args, "expert_model_parallel_size", None) is None:  # slime's args carry it
        args.expert_model_parallel_size = ps.get_expert_model_parallel_world_size()
    if engine is not None:
        engine.begin_sync(index)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    count = 0

    def flush() -> None:
        nonlocal bucket, size
        if bucket:
            engine.load_weights([pair for n, t in bucket for pair in convert_gemma4_to_hf(args, n, t)])
        bucket, size = [], 0

    for name, full in iter_global_params(model):
        count += 1
        if engine is None:
            continue
        bucket.append((WRAPPER_PREFIX + name, full))
        size += full.numel() * full.element_size()
        if size >= bucket_bytes:
            flush()
    if engine is None:
        return None
    flush()
    return engine.end_sync(megatron_params=count)

"""Tensor- and expert-parallel sharding of Megatron tensors, by the layout the mapping table declares.

Layouts (``Rule.tp_layout``), as Megatron's parallel layers hold them on TP rank ``r`` of ``tp``:

* ``qkv``: ``linear_qkv`` split along dim 0: with ``ng >= tp`` rank r holds whole KV groups
  ``[r*ng/tp, (r+1)*ng/tp)``, each ``[its q heads, k_g(, v_g)]``; with fewer KV heads than ranks
  (``tp % ng == 0``) rank r holds a contiguous slice of the packed rows and the attention all-gathers
  them and keeps its replicated group (``gemma4.model.attention``).
* ``glu``: ``linear_fc1`` on rank r is ``[gate_r; up_r]`` (each half split along dim 0, then concatenated),
  the layout Megatron's ``apply_swiglu_sharded_factory`` checkpoints.
* ``column`` / ``vocab``: split along dim 0 (``vocab``: the embedding and output layer; vocab % tp == 0).
* ``row``: split along dim 1 (``linear_proj``, ``linear_fc2``).
* ``replicated``: every rank holds the full tensor (norms, q/k layernorms, ``layer_scalar``); gathering checks
  that all ranks agree bit for bit.

Each split layout is the ``(partition_dim, partition_stride)`` Megatron gives the parameter
(:data:`PARTITION`), cut by the one split rule, :func:`gemma4.parallel.tp_shard` /
:func:`gemma4.parallel.tp_join`, which :func:`gemma4.parallel.shard_like` applies to live parameters from
their metadata. Two entry points because two inputs: here checkpoint tensors with no model (the layout comes
from the mapping table), there a Megatron parameter (the layout comes from its attributes at run time).

Expert parallelism places global expert ``e`` on EP rank ``e // (E/ep)`` as local expert ``e % (E/ep)``
(:func:`gemma4.conversion.mapping.expert_placement`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gemma4.config import Gemma4TextSpec
from gemma4.conversion import mapping
from gemma4.errors import InvalidInputError
from gemma4.parallel import tp_join, tp_split


def check_tp(spec: Gemma4TextSpec, tp: int) -> None:
    """Refuse a tensor-parallel size the model cannot be split into, naming the flag and the culprit.

    The rules are the model's (``Gemma4SelfAttention``): a layer's KV-head count and ``tp`` must divide one
    another; with fewer KV heads than ranks each rank holds a contiguous slice of the packed ``linear_qkv``
    rows and the KV groups are replicated at run time, so the checkpoint layout is the same dim-0 split.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise InvalidInputError(f"--tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    for layer, (nkv, t) in enumerate(zip(spec.num_kv_heads, spec.layer_types)):
        if (nkv >= tp and nkv % tp) or (nkv < tp and tp % nkv):
            raise InvalidInputError(
                f"--tp {tp}: layer {layer} ({t}) has {nkv} KV heads; the KV-head count and the "
                "tensor-parallel size must divide one another"
            )
    sizes = [
        ("num_attention_heads", spec.num_attention_heads),
        ("vocab_size", spec.vocab_size),  # the embedding is split along the vocabulary (no padding)
        ("intermediate_size", spec.intermediate_size),
    ]
    if mapping._num_experts(spec):
        sizes.append(("moe_intermediate_size", spec.moe_intermediate_size))
    for name, value in sizes:
        if value % tp:
            raise InvalidInputError(
                f"--tp {tp}: {name!r} {value} is not divisible by the tensor-parallel size"
            )
    # Every other split the table implies (per-layer MLP widths, PLE tables, q-only rows of KV-shared
    # layers, ...), checked on meta tensors so the message names the Megatron tensor.
    for rule, layer in mapping.bound_rules(spec):
        metas = [torch.empty(mapping.hf_shape(n, spec, layer), device="meta") for n in rule.hf]
        w = mapping.rule_to_mcore(rule, metas, spec, layer)
        for i, t in enumerate(w if rule.is_expert else [w]):
            name = rule.mcore.format(e=i) if rule.is_expert else rule.mcore
            try:
                shard_tp(rule, t, tp, name)
            except InvalidInputError as exc:
                raise InvalidInputError(f"--tp {tp}: {exc}") from exc


def check_ep(spec: Gemma4TextSpec, ep: int) -> None:
    """Refuse an expert-parallel size that does not fit the model (any ``ep > 1`` for a dense model)."""
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise InvalidInputError(f"--ep must be a positive integer, got {ep!r}")
    experts = mapping._num_experts(spec)
    if ep > 1 and experts == 0:
        raise InvalidInputError(f"--ep {ep}: this is a dense model with no experts to shard; use --ep 1")
    if experts and experts % ep:
        raise InvalidInputError(f"--ep {ep}: 'num_experts' {experts} is not divisible by the EP size")


#: The ``(partition_dim, partition_stride)`` Megatron sets on a parameter of each split layout.
PARTITION: dict[str, tuple[int, int]] = {
    mapping.COLUMN: (0, 1),
    mapping.VOCAB: (0, 1),
    mapping.QKV_GROUPS: (0, 1),
    mapping.ROW: (1, 1),
    mapping.GLU: (0, 2),
}


def _partition(layout: str, what: str) -> tuple[int, int]:
    if layout not in PARTITION:
        raise ValueError(f"{what}: unknown TP layout {layout!r}")
    return PARTITION[layout]


def shard_tp(rule: mapping.Rule, t: torch.Tensor, tp: int, what: str | None = None) -> list[torch.Tensor]:
    """The TP=1 Megatron tensor ``t`` of ``rule`` -> one tensor per TP rank (views where possible)."""
    what = what or rule.mcore
    layout = rule.tp_layout
    if tp == 1:
        return [t]
    if layout == mapping.REPLICATED:
        return [t] * tp
    dim, stride = _partition(layout, what)
    return tp_split(t, tp, dim, stride, what)


def gather_tp(rule: mapping.Rule, shards: Sequence[torch.Tensor], what: str | None = None) -> torch.Tensor:
    """Inverse of :func:`shard_tp`. Replicated tensors must agree bit for bit across ranks."""
    what = what or rule.mcore
    layout = rule.tp_layout
    if len(shards) == 1:
        return shards[0]
    if layout == mapping.REPLICATED:
        first = shards[0]
        for r, s in enumerate(shards[1:], start=1):
            if s.shape != first.shape or not torch.equal(s, first):
                raise InvalidInputError(
                    f"tensor {what!r} is replicated across tensor-parallel ranks but rank {r} differs from rank 0"
                )
        return first
    dim, stride = _partition(layout, what)
    return tp_join(shards, dim, stride, what)


def shard_experts(experts: Sequence[torch.Tensor], ep: int) -> list[list[tuple[int, torch.Tensor]]]:
    """Global per-expert tensors -> for each EP rank, its ``(local index, tensor)`` pairs."""
    num = len(experts)
    if num % ep:
        raise InvalidInputError(f"--ep {ep}: {num} experts cannot be split evenly")
    out: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(ep)]
    for e, t in enumerate(experts):
        rank, local = mapping.expert_placement(e, num, ep)
        out[rank].append((local, t))
    return out


def gather_experts(per_rank: Sequence[Sequence[torch.Tensor]], num_experts: int) -> list[torch.Tensor]:
    """Per-EP-rank local expert tensors (local order) -> global expert order."""
    ep = len(per_rank)
    out: list[torch.Tensor | None] = [None] * num_experts
    for rank, local_tensors in enumerate(per_rank):
        for local, t in enumerate(local_tensors):
            out[mapping.global_expert_index(rank, local, num_experts, ep)] = t
    missing = [e for e, t in enumerate(out) if t is None]
    if missing:
        raise InvalidInputError(f"experts {missing} are missing from the expert-parallel ranks")
    return out  # type: ignore[return-value]

"""Step 4, our side: this repo's Megatron-Core Gemma 4 built for the layout on each rank (or the single
process), loaded with the reference's weights, run on the (padded) inputs with the capture hooks, optionally
backpropagated; then every rank's local pieces assembled into full-sequence tensors.

:data:`harness.parity.impl.OURS` runs :func:`run_megatron_rank`; :func:`_assemble` serves any implementation
that reports :class:`~harness.parity.impl.RankResult` in Megatron's TP/CP/DP layout.
"""

from __future__ import annotations

import torch

from gemma4.config import Gemma4TextSpec
from harness.compare import tensor_diff
from harness.parity.capture import capture_mcore
from harness.parity.impl import RankResult
from harness.parity.inputs import SequencePadding, lm_loss
from harness.parity.layout import RunLayout, pad_weights, tp_padding
from harness.tolerances import GRAD_SCALE_FLOOR


def finalize_grads(model: torch.nn.Module, config) -> None:
    """What Megatron's DDP + finalize_model_grads do for these grads: sum over data x context parallel ranks
    (each saw other tokens) for every parameter Megatron all-reduces (``allreduce``: not the experts an EP
    rank owns), and over TP for sequence-parallel norm weights and q/k layernorms (each rank saw part)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    expert_dp = ps.get_expert_data_parallel_group()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        # Experts an EP rank owns are summed over the ranks holding the same experts (expert data parallel).
        group = dp_cp if getattr(p, "allreduce", True) else expert_dp
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        if ps.get_tensor_model_parallel_world_size() > 1 and (
            (config.sequence_parallel and getattr(p, "sequence_parallel", False))
            or "q_layernorm" in name
            or "k_layernorm" in name
        ):
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def run_megatron_rank(
    rank: int,
    world: int,
    spec: Gemma4TextSpec,
    dtype: torch.dtype,
    full_weights: dict[str, torch.Tensor],
    seq: SequencePadding,
    layout: RunLayout,
    ref_grads: dict[str, torch.Tensor] | None,
) -> RankResult:
    """Our side on one rank (or the single process): local activations, logits, gradient errors.

    ``full_weights`` / ``ref_grads`` are TP = 1 Megatron tensors of the unpadded spec; ``seq`` the (padded)
    input."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from gemma4.model.build import build_gemma4_model
    from gemma4.model.sequence_layout import shard_for_cp
    from gemma4.parallel import global_expert_name, load_full_state_dict, shard_like

    tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    overrides = {"expert_model_parallel_size": layout.ep} if spec.enable_moe else {}
    if layout.recompute:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    vocab = spec.vocab_size
    full_weights = pad_weights(full_weights, layout.tp)
    ref_grads = pad_weights(ref_grads, layout.tp) if ref_grads is not None else None
    model = build_gemma4_model(
        tp_padding(spec, layout.tp),
        dtype,
        tensor_model_parallel_size=layout.tp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        **overrides,
    )
    load_full_state_dict(model, full_weights, tp_rank, layout.tp, ep_rank, layout.ep)
    grads = ref_grads is not None
    model.train(grads)  # a training step when gradients are compared (dropout is 0 either way)
    rows = seq.ids.shape[0] // layout.ep  # EP ranks are data-parallel replicas: each takes its rows
    labels = seq.labels[dp_rank * rows : (dp_rank + 1) * rows]
    ids = seq.ids[dp_rank * rows : (dp_rank + 1) * rows]
    cu = seq.cu_padded
    local_ids = shard_for_cp(ids, cu, layout.cp, cp_rank)
    local_labels = shard_for_cp(labels, cu, layout.cp, cp_rank)
    packed = None
    if layout.packed:
        longest = int((cu[1:] - cu[:-1]).max())
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=seq.cu_real,
            cu_seqlens_kv=seq.cu_real,
            cu_seqlens_q_padded=cu,
            cu_seqlens_kv_padded=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
    acts: dict[str, torch.Tensor] = {}
    with torch.set_grad_enabled(grads), capture_mcore(model, acts):
        logits = model(local_ids, packed_seq_params=packed)
        if layout.tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits)[..., :vocab]  # drop padded vocab
    out = RankResult(tp_rank, cp_rank, dp_rank, ep_rank, acts, logits.detach())
    if grads:
        lm_loss(logits, local_labels).backward()
        finalize_grads(model, model.config)
        diffs, missing = {}, []
        floor = GRAD_SCALE_FLOOR * max(float(g.abs().max()) for g in ref_grads.values() if g.numel())
        for name, p in model.named_parameters():
            if p.grad is None:
                missing.append(name)
                continue
            ref = ref_grads[global_expert_name(name, ep_rank, layout.ep, spec.num_experts or 1)]
            d = tensor_diff(p.grad, shard_like(ref, p, tp_rank, layout.tp))
            diffs[name] = {
                "max_abs": d.max_abs,
                "ref_max_abs": d.ref_max_abs,
                "scaled": d.max_abs / max(d.ref_max_abs, floor, 1e-300),
            }
        out.grad_diffs, out.missing_grads = diffs, missing
    return out


def _assemble(results: list[RankResult], layout: RunLayout, seq: SequencePadding):
    """Full-sequence activations and logits from every rank's local pieces."""
    from gemma4.model.sequence_layout import unshard_from_cp

    def one_data_rank(group: list[RankResult]):
        by_cp: dict[int, list[RankResult]] = {}
        for r in group:
            by_cp.setdefault(r.cp_rank, []).append(r)
        acts_per_cp, logits_per_cp = [], []
        for cp_rank in range(layout.cp):
            ranks = sorted(by_cp[cp_rank], key=lambda r: r.tp_rank)
            if layout.sequence_parallel:  # activations are sequence-sharded over TP, contiguous chunks
                acts = {k: torch.cat([r.acts[k] for r in ranks], dim=1) for k in ranks[0].acts}
            else:
                acts = ranks[0].acts
            acts_per_cp.append(acts)
            logits_per_cp.append(ranks[0].logits)
        acts = {k: unshard_from_cp([a[k] for a in acts_per_cp], cu) for k in acts_per_cp[0]}
        return unshard_from_cp(logits_per_cp, cu), acts

    by_dp: dict[int, list[RankResult]] = {}
    for r in results:
        by_dp.setdefault(r.dp_rank, []).append(r)
    cu = seq.cu_padded
    parts = [one_data_rank(by_dp[d]) for d in sorted(by_dp)]  # data-parallel ranks hold consecutive rows
    keep = seq.real_index  # drop sequence padding
    logits = torch.cat([p[0] for p in parts], dim=0).index_select(1, keep)
    acts = {k: torch.cat([p[1][k] for p in parts], dim=0).index_select(1, keep) for k in parts[0][1]}
    acts["logits"] = logits
    return logits, acts

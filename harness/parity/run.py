"""HF vs Megatron parity of a whole Gemma 4 text model: logits, every layer's activations, gradients.

Both models get the same weights (the reference's, mapped through :mod:`gemma4.conversion.mapping`) and the
same token ids. Activations are captured at the same points on both sides, in forward order::

    embedding, layer.{i}.attention, layer.{i}.mlp, layer.{i}.output, ..., final_norm, logits

so the first point that exceeds the tolerance localises a bug to a layer and submodule.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.config import Gemma4TextSpec, hf_text_config_from_any, text_spec_from_hf
from gemma4.errors import InvalidInputError
from harness.budget import check_budget, estimate_run
from harness.compare import TensorDiff, logit_stats, tensor_diff
from harness.layout import RunLayout, validate_layout
from harness.provenance import software_versions
from harness.tolerances import GRAD_SCALE_FLOOR, Tolerance, reordered, tolerance_for

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ParitySource:
    """What a parity run compares: an HF text config and optionally real weights.

    Weights of a checkpoint are read only by :meth:`materialize` (``loader``), after the run's memory
    estimate passed; every tensor must be finite (a non-finite weight is invalid input, not a port bug).
    """

    label: str
    hf_config: Any
    spec: Gemma4TextSpec
    weights: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    loader: Callable[[], dict[str, torch.Tensor]] | None = None

    def materialize(self) -> None:
        """Read the checkpoint's weights (once) and refuse non-finite values, naming the tensor."""
        if self.weights is None and self.loader is not None:
            self.weights, self.loader = self.loader(), None
        for name, t in (self.weights or {}).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                kinds = [k for k, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(t).any())]
                raise InvalidInputError(
                    f"{self.label}: tensor {name!r} holds {bad} non-finite value(s) ({' and '.join(kinds)}); "
                    "parity needs finite weights (this is the input, not the port)"
                )


def resolve_source(
    preset: str | None = None, hf_config: str | Path | None = None, hf_checkpoint: str | Path | None = None
) -> ParitySource:
    """Exactly one of ``preset``, ``hf_config`` (config.json) or ``hf_checkpoint`` (directory)."""
    chosen = [x for x in (preset, hf_config, hf_checkpoint) if x is not None]
    if len(chosen) != 1:
        raise InvalidInputError("give exactly one of --preset, --hf-config, --hf-checkpoint")
    if preset is not None:
        from harness.presets import preset_config_dict

        cfg = hf_text_config_from_any(preset_config_dict(preset))
        return ParitySource(f"preset:{preset}", cfg, text_spec_from_hf(cfg))
    if hf_config is not None:
        cfg = hf_text_config_from_any(Path(hf_config))
        return ParitySource(f"config:{hf_config}", cfg, text_spec_from_hf(cfg))

    from gemma4.conversion.hf_io import open_hf_checkpoint

    # Validated like the converter validates: names, shapes, dtypes against config.json; dead K/V of
    # KV-shared layers and a tied lm_head copy are dropped with a note.
    ckpt = open_hf_checkpoint(Path(hf_checkpoint))
    return ParitySource(
        f"checkpoint:{hf_checkpoint}",
        ckpt.hf_config,
        ckpt.spec,
        None,
        list(ckpt.notes),
        loader=lambda: {name: ckpt.read(name) for name in ckpt.tensors},
    )


# ---- activation capture ---------------------------------------------------------------------------------


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_hf(model: torch.nn.Module, store: dict[str, torch.Tensor]):
    """Record the reference's activations (``[b, s, h]``) at the standard capture points."""
    m = model.model
    hooks = [
        m.embed_tokens.register_forward_hook(
            lambda mod, i, o: store.__setitem__("embedding", o.detach().clone())
        )
    ]
    for idx, layer in enumerate(m.layers):
        points = [(layer.self_attn, "attention"), (layer.mlp, "mlp"), (layer, "output")]
        if getattr(layer, "enable_moe_block", False):  # routed experts after their output norm
            points.insert(2, (layer.post_feedforward_layernorm_2, "experts"))
        for sub, name in points:
            key = f"layer.{idx}.{name}"
            hooks.append(
                sub.register_forward_hook(
                    lambda mod, i, o, key=key: store.__setitem__(key, _first(o).detach().clone())
                )
            )
    hooks.append(
        m.norm.register_forward_hook(lambda mod, i, o: store.__setitem__("final_norm", o.detach().clone()))
    )
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def capture_mcore(model: torch.nn.Module, store: dict[str, torch.Tensor]):
    """Record our activations at the same points, transposed from ``[s, b, h]`` to ``[b, s, h]``."""

    def put(key, t):
        store[key] = t.detach().transpose(0, 1).clone()

    layers = model.decoder.layers
    hooks = [
        layers[0].register_forward_pre_hook(
            lambda mod, args, kwargs: put(
                "embedding", kwargs.get("hidden_states", args[0] if args else None)
            ),
            with_kwargs=True,
        )
    ]
    for idx, layer in enumerate(layers):
        points = [(layer.self_attention, "attention"), (layer.mlp, "mlp"), (layer, "output")]
        if hasattr(layer.mlp, "dense_mlp"):  # MoE block: "mlp" is its dense branch, like HF's layer.mlp
            points = [
                (layer.self_attention, "attention"),
                (layer.mlp.dense_mlp, "mlp"),
                (layer.mlp.post_experts_layernorm, "experts"),
                (layer, "output"),
            ]
        for sub, name in points:
            key = f"layer.{idx}.{name}"
            hooks.append(sub.register_forward_hook(lambda mod, i, o, key=key: put(key, _first(o))))
    hooks.append(model.decoder.final_layernorm.register_forward_hook(lambda mod, i, o: put("final_norm", o)))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def capture_order(spec: Gemma4TextSpec) -> list[str]:
    """Capture point names in forward order."""
    names = ["embedding"]
    for i in range(spec.num_layers):
        names += [f"layer.{i}.attention", f"layer.{i}.mlp"]
        if spec.enable_moe:
            names.append(f"layer.{i}.experts")
        names.append(f"layer.{i}.output")
    return names + ["final_norm", "logits"]


def describe_point(spec: Gemma4TextSpec, name: str) -> str:
    """Human-readable capture point, e.g. ``layer 3 (full_attention) attention``."""
    if name.startswith("layer."):
        _, idx, sub = name.split(".")
        return f"layer {idx} ({spec.layer_types[int(idx)]}) {sub}"
    return name


# ---- the run ---------------------------------------------------------------------------------------------


def make_inputs(spec: Gemma4TextSpec, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded random token ids ``[batch, seq_len]``."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, spec.vocab_size, (batch, seq_len), generator=gen)


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    """``[0, L1, L1 + L2, ...]`` as int32 (Megatron's ``cu_seqlens``)."""
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def next_token_labels(ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Next token within the same document; -100 on each document's last token."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    for end in cu[1:].tolist():
        labels[:, end - 1] = -100
    return labels


@dataclass(frozen=True)
class SequencePadding:
    """Our side's input when CP / SP need lengths the real ones are not: each document (each row when
    unpacked) padded at its end, as Megatron/slime pad (``cu_seqlens_*_padded``). Real tokens never see the
    padding (it comes after them in its document), and the comparison keeps only the real positions."""

    ids: torch.Tensor  # [b, S_pad]
    labels: torch.Tensor  # [b, S_pad], -100 on padding and on each document's last real token
    cu_real: torch.Tensor
    cu_padded: torch.Tensor
    real_index: torch.Tensor  # positions of the real tokens in the padded row


def pad_sequences(ids: torch.Tensor, lengths: list[int], layout: RunLayout, pad_id: int) -> SequencePadding:
    """Pad every document to a multiple of ``2·cp`` (CP zig-zag) and the total so each CP rank's tokens
    divide by TP under sequence parallelism."""
    unit = 2 * layout.cp if layout.cp > 1 else 1
    padded = [-(-n // unit) * unit for n in lengths]
    if layout.sequence_parallel:
        while (sum(padded) // layout.cp) % layout.tp:
            padded[-1] += unit
    cu_real = cu_seqlens_of(lengths)
    labels = next_token_labels(ids, cu_real)
    pieces_ids, pieces_labels, index, start = [], [], [], 0
    for (a, b), n_pad in zip(zip(cu_real[:-1].tolist(), cu_real[1:].tolist()), padded):
        extra = n_pad - (b - a)
        pieces_ids += [ids[:, a:b], torch.full((ids.shape[0], extra), pad_id, dtype=ids.dtype)]
        pieces_labels += [labels[:, a:b], torch.full((ids.shape[0], extra), -100, dtype=labels.dtype)]
        index.append(torch.arange(start, start + b - a))
        start += n_pad
    return SequencePadding(
        torch.cat(pieces_ids, dim=1),
        torch.cat(pieces_labels, dim=1),
        cu_real,
        cu_seqlens_of(padded),
        torch.cat(index),
    )


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def tp_padding(spec: Gemma4TextSpec, tp: int) -> Gemma4TextSpec:
    """The spec our model is built with under TP: vocabularies and MLP widths rounded up to a multiple of TP
    (Megatron pads the vocabulary the same way). Padded rows/columns are zero, so the math is unchanged;
    padded vocabulary entries are cut from the logits before anything is compared or trained."""
    import dataclasses

    if tp == 1:
        return spec
    return dataclasses.replace(
        spec,
        vocab_size=_ceil_to(spec.vocab_size, tp),
        ple_vocab_size=_ceil_to(spec.ple_vocab_size, tp) if spec.ple_vocab_size else 0,
        intermediate_size=_ceil_to(spec.intermediate_size, tp),
        intermediate_sizes=tuple(_ceil_to(i, tp) for i in spec.intermediate_sizes),
        moe_intermediate_size=_ceil_to(spec.moe_intermediate_size, tp)
        if spec.moe_intermediate_size
        else None,
    )


def pad_weights(full: dict[str, torch.Tensor], tp: int) -> dict[str, torch.Tensor]:
    """Zero-pad TP = 1 Megatron tensors to the :func:`tp_padding` sizes (vocab rows, GLU halves, fc2 columns)."""
    if tp == 1:
        return full
    out = {}
    for name, t in full.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight", "per_layer_embedding.weight"):
            t = torch.nn.functional.pad(t, (0, 0, 0, _ceil_to(t.shape[0], tp) - t.shape[0]))
        elif name.endswith("linear_fc1.weight"):  # [gate; up]: pad each half
            gate, up = t.chunk(2, dim=0)
            extra = _ceil_to(gate.shape[0], tp) - gate.shape[0]
            t = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, extra)) for h in (gate, up)])
        elif name.endswith("linear_fc2.weight"):
            t = torch.nn.functional.pad(t, (0, _ceil_to(t.shape[1], tp) - t.shape[1]))
        out[name] = t
    return out


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (computed in fp32, fp64 for fp64 runs), same code for both sides."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, v).to(cdt), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


# ---- the two sides ---------------------------------------------------------------------------------------


def run_reference(hf: torch.nn.Module, ids: torch.Tensor, cu: torch.Tensor, packed: bool, grads: bool):
    """HF logits and activations ``[b, S, ...]``; a packed row runs each document alone (then concatenated)."""
    acts: dict[str, torch.Tensor] = {}
    with torch.set_grad_enabled(grads):
        if not packed:
            with capture_hf(hf, acts):
                logits = hf(input_ids=ids, use_cache=False).logits
        else:
            per_doc, doc_acts = [], []
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
                store: dict[str, torch.Tensor] = {}
                with capture_hf(hf, store):
                    per_doc.append(hf(input_ids=ids[:, start:end], use_cache=False).logits)
                doc_acts.append(store)
            logits = torch.cat(per_doc, dim=1)
            acts = {k: torch.cat([d[k] for d in doc_acts], dim=1) for k in doc_acts[0]}
        if grads:
            lm_loss(logits, next_token_labels(ids, cu)).backward()
    acts["logits"] = logits.detach()
    return logits, acts


def reference_noise(
    source: ParitySource,
    dtype: torch.dtype,
    seed: int,
    ids: torch.Tensor,
    cu: torch.Tensor,
    layout: RunLayout,
    ref_acts: dict[str, torch.Tensor],
) -> tuple[float, float, float]:
    """How far the ``dtype`` reference is from the exact-fp64 one on these inputs: logits max abs,
    worst scaled activation error, mean KL (see ``tolerances.reordered``)."""
    from harness.reference import build_reference_model

    exact = build_reference_model(source.hf_config, torch.float64, seed=seed, weights=source.weights)
    _, exact_acts = run_reference(exact, ids, cu, bool(layout.packed), grads=False)
    logits = tensor_diff(ref_acts["logits"], exact_acts["logits"]).max_abs
    acts = max(tensor_diff(ref_acts[k], exact_acts[k]).scaled for k in exact_acts if k != "logits")
    kl = logit_stats(ref_acts["logits"], exact_acts["logits"]).kl_mean
    return logits, acts, kl


def require_finite_reference(
    spec: Gemma4TextSpec, ref_acts: dict[str, torch.Tensor], label: str, dtype: torch.dtype
) -> None:
    """The HF reference must be finite everywhere: if HF itself overflows or produces NaN on these weights
    and inputs, there is nothing to compare the port with, and blaming the port would be wrong. Raises
    :class:`InvalidInputError` naming the first non-finite capture point."""
    for name in capture_order(spec):
        t = ref_acts.get(name)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise InvalidInputError(
                f"{label}: the HF reference itself is non-finite at {describe_point(spec, name)} in "
                f"{str(dtype).removeprefix('torch.')} (NaN/inf from the weights or config, e.g. values that "
                "overflow this dtype); not a port failure, fix the input"
            )


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
) -> dict[str, Any]:
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
    out: dict[str, Any] = {
        "tp_rank": tp_rank,
        "cp_rank": cp_rank,
        "dp_rank": dp_rank,
        "ep_rank": ep_rank,
        "acts": acts,
        "logits": logits.detach(),
    }
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
        out["grad_diffs"], out["missing_grads"] = diffs, missing
    return out


def _assemble(results: list[dict[str, Any]], layout: RunLayout, seq: SequencePadding):
    """Full-sequence activations and logits from every rank's local pieces."""
    from gemma4.model.sequence_layout import unshard_from_cp

    def one_data_rank(group: list[dict[str, Any]]):
        by_cp: dict[int, list[dict[str, Any]]] = {}
        for r in group:
            by_cp.setdefault(r["cp_rank"], []).append(r)
        acts_per_cp, logits_per_cp = [], []
        for cp_rank in range(layout.cp):
            ranks = sorted(by_cp[cp_rank], key=lambda r: r["tp_rank"])
            if layout.sequence_parallel:  # activations are sequence-sharded over TP, contiguous chunks
                acts = {k: torch.cat([r["acts"][k] for r in ranks], dim=1) for k in ranks[0]["acts"]}
            else:
                acts = ranks[0]["acts"]
            acts_per_cp.append(acts)
            logits_per_cp.append(ranks[0]["logits"])
        acts = {k: unshard_from_cp([a[k] for a in acts_per_cp], cu) for k in acts_per_cp[0]}
        return unshard_from_cp(logits_per_cp, cu), acts

    by_dp: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_dp.setdefault(r.get("dp_rank", 0), []).append(r)
    cu = seq.cu_padded
    parts = [one_data_rank(by_dp[d]) for d in sorted(by_dp)]  # data-parallel ranks hold consecutive rows
    keep = seq.real_index  # drop sequence padding
    logits = torch.cat([p[0] for p in parts], dim=0).index_select(1, keep)
    acts = {k: torch.cat([p[1][k] for p in parts], dim=0).index_select(1, keep) for k in parts[0][1]}
    acts["logits"] = logits
    return logits, acts


# ---- the run ---------------------------------------------------------------------------------------------


def run_parity(
    source: ParitySource,
    dtype: torch.dtype = torch.float64,
    *,
    batch: int = 2,
    seq_len: int = 24,
    seed: int = 0,
    grads: bool = False,
    tolerance: Tolerance | None = None,
    layout: RunLayout | None = None,
    timeout: float | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build both models, run them on the same ids, compare. Returns the JSON-ready result dict.

    ``layout`` runs our side with TP/CP (forked gloo processes) and/or one packed row of documents; the
    reference always runs unsharded, a packed row one document at a time.
    """
    from gemma4.conversion.mapping import hf_to_mcore
    from gemma4.runtime import init_single_process
    from harness.distributed import Parallelism, run_distributed
    from harness.reference import build_reference_model, hf_text_state_dict

    layout = layout or RunLayout()
    if layout.packed:
        batch, seq_len = 1, sum(layout.packed)
    if batch < 1 or seq_len < 2:
        raise InvalidInputError(f"--batch must be >= 1 and --seq-len >= 2 (got {batch}, {seq_len})")
    spec = source.spec
    validate_layout(spec, layout, batch, seq_len)
    # Nothing is allocated before the estimate: a config or flag asking for terabytes is refused (exit 2).
    forced = check_budget(
        estimate_run(spec, dtype, batch, seq_len, grads=grads, world_size=layout.world_size),
        force=force,
        what=f"parity {source.label} {str(dtype).removeprefix('torch.')} batch {batch} x seq {seq_len}",
    )
    source.materialize()
    tol = tolerance or tolerance_for(dtype)
    t0 = time.perf_counter()
    hf = build_reference_model(source.hf_config, dtype, seed=seed, weights=source.weights)
    hf_weights = hf_text_state_dict(hf)
    full_weights = hf_to_mcore(hf_weights, spec)
    ids = make_inputs(spec, batch, seq_len, seed)
    cu = cu_seqlens_of(list(layout.packed) if layout.packed else [seq_len])

    ref_logits, ref_acts = run_reference(hf, ids, cu, bool(layout.packed), grads)
    require_finite_reference(spec, ref_acts, source.label, dtype)
    # fp32: Megatron's packed GEMMs may sum in another order than HF's separate projections; bf16 stays
    # mirrored (bitwise) unless the layout or the MoE dispatcher reorders sums (see tolerances.reordered).
    reorders = layout.world_size > 1 or bool(layout.packed) or spec.enable_moe
    if tolerance is None and (dtype == torch.float32 or (dtype == torch.bfloat16 and reorders)):
        tol = reordered(tol, *reference_noise(source, dtype, seed, ids, cu, layout, ref_acts))
    ref_grads = None
    if grads:
        named = dict(hf.named_parameters())
        hf_grads = {}
        for k, v in hf_weights.items():
            param = named.get(("" if k.startswith("lm_head.") else "model.") + k)
            hf_grads[k] = param.grad if param is not None else torch.zeros_like(v)
        for k, g in hf_grads.items():
            if not bool(torch.isfinite(g).all()):
                raise InvalidInputError(
                    f"{source.label}: the HF reference's gradient of {k!r} is non-finite; the loss overflows "
                    "on this input (not a port failure)"
                )
        ref_grads = hf_to_mcore(hf_grads, spec)
    t_ref = time.perf_counter() - t0

    t1 = time.perf_counter()
    lengths = list(layout.packed) if layout.packed else [seq_len]
    seq = pad_sequences(ids, lengths, layout, spec.pad_token_id or 0)
    args = (spec, dtype, full_weights, seq, layout, ref_grads)
    if layout.world_size == 1:
        init_single_process()
        results = [run_megatron_rank(0, 1, *args)]
    else:
        par = Parallelism(
            tp=layout.tp, cp=layout.cp, ep=layout.ep, sequence_parallel=layout.sequence_parallel
        )
        deadline = {} if timeout is None else {"timeout": timeout}
        results = run_distributed(run_megatron_rank, par, *args, **deadline)
    our_logits, our_acts = _assemble(results, layout, seq)
    t_ours = time.perf_counter() - t1

    points: dict[str, TensorDiff] = {
        name: tensor_diff(our_acts[name], ref_acts[name]) for name in capture_order(spec)
    }
    stats = logit_stats(our_logits, ref_logits)
    logits_diff = points["logits"]
    activations_worst = max(d.scaled for n, d in points.items() if n != "logits")

    failures: list[str] = []
    first_divergence = None
    for name in capture_order(spec):
        d = points[name]
        # `not (x <= bound)`: a NaN error is a failure, never a pass
        ok = d.max_abs <= tol.logits_max_abs if name == "logits" else d.scaled <= tol.activations_max_scaled
        if not ok:
            first_divergence = describe_point(spec, name)
            break
    if not logits_diff.max_abs <= tol.logits_max_abs:
        failures.append(f"logits max abs {logits_diff.max_abs:.3e} > {tol.logits_max_abs:.0e}")
    if not activations_worst <= tol.activations_max_scaled:
        failures.append(
            f"activations max scaled error {activations_worst:.3e} > {tol.activations_max_scaled:.0e}"
        )
    if tol.kl_max is not None and not stats.kl_mean <= tol.kl_max:
        failures.append(f"mean KL {stats.kl_mean:.3e} > {tol.kl_max:.0e}")
    if tol.argmax_min is not None and not stats.argmax_agreement >= tol.argmax_min:
        failures.append(f"argmax agreement {stats.argmax_agreement:.3f} < {tol.argmax_min}")

    grad_report: dict[str, Any] | None = None
    if grads:
        per_param: dict[str, dict[str, float]] = {}
        for r in results:
            for name in r["missing_grads"]:
                failures.append(
                    f"parameter {name} got no gradient (tp rank {r['tp_rank']}, cp rank {r['cp_rank']})"
                )
            for name, d in r["grad_diffs"].items():
                key = (
                    name
                    if layout.world_size == 1
                    else f"{name}@tp{r['tp_rank']}cp{r['cp_rank']}ep{r['ep_rank']}"
                )
                per_param[key] = d
        worst_name = max(per_param, key=lambda n: per_param[n]["scaled"]) if per_param else None
        worst = per_param[worst_name]["scaled"] if worst_name else 0.0
        grad_report = {"max_scaled": worst, "worst_parameter": worst_name, "per_parameter": per_param}
        if tol.grads_max_scaled is not None and not worst <= tol.grads_max_scaled:
            failures.append(
                f"gradient of {worst_name}: scaled error {worst:.3e} > {tol.grads_max_scaled:.0e}"
            )
            if first_divergence is None:
                first_divergence = f"gradient of {worst_name}"

    if first_divergence is None and failures:
        first_divergence = "logits"
    return {
        "pass": not failures,
        "source": source.label,
        "dtype": str(dtype).removeprefix("torch."),
        "exact_fp64_reference": dtype == torch.float64,
        "batch": batch,
        "seq_len": seq_len,
        "seed": seed,
        "layout": {
            "name": layout.name,
            "tp": layout.tp,
            "cp": layout.cp,
            "sequence_parallel": layout.sequence_parallel,
            "packed": list(layout.packed) if layout.packed else None,
        },
        "metrics": {
            "logits": logits_diff.to_json(),
            "kl_mean": stats.kl_mean,
            "kl_max": stats.kl_max,
            "argmax_agreement": stats.argmax_agreement,
            "max_abs_logprob": stats.max_abs_logprob,
            "activations_max_scaled": activations_worst,
            "grads_max_scaled": grad_report["max_scaled"] if grad_report else None,
        },
        "tolerance": tol.to_json(),
        "first_divergence": first_divergence,
        "failures": failures,
        "per_point": {name: d.to_json() for name, d in points.items()},
        "grads": grad_report,
        "config": spec.to_json_dict(),
        "notes": source.notes + ([forced] if forced else []),
        "timings_s": {"reference": t_ref, "megatron": t_ours},
        "versions": software_versions(),
        "_tensors": {
            "input_ids": ids,
            "cu_seqlens": cu if layout.packed else None,
            "megatron_logits": our_logits.detach(),
            "hf_logits": ref_logits.detach(),
        },
    }

"""The pipeline: HF vs Megatron parity of a whole Gemma 4 text model (logits, every layer's activations,
gradients), one step per module::

    source -> inputs -> reference_side -> impl (megatron_side) -> judge -> result

Both models get the same weights (the reference's, mapped through :mod:`gemma4.conversion.mapping`) and the
same token ids; activations are captured at the same points on both sides (:mod:`harness.parity.capture`).
"""

from __future__ import annotations

import time

import torch

from gemma4.errors import InvalidInputError
from harness.budget import check_budget, estimate_run
from harness.compare import logit_stats
from harness.parity import megatron_side, reference_side
from harness.parity.capture import capture_order
from harness.parity.impl import OURS, ImplementationBroken, ImplementationUnderTest, RankResult
from harness.parity.inputs import cu_seqlens_of, make_inputs, pad_sequences
from harness.parity.judge import GradientErrors, judge, point_diffs
from harness.parity.layout import RunLayout, validate_layout
from harness.parity.result import ParityResult, ParityTensors
from harness.parity.source import ParitySource
from harness.provenance import software_versions
from harness.tolerances import FP64_EXACT, FP64_FP32_ISLANDS, Tolerance, reordered, tolerance_for


class UnsupportedByImplementation(InvalidInputError):
    """The implementation under test cannot run this config or layout (exit 2): reported as unsupported,
    never as a numerical failure.

    ``reason`` is the implementation's own reason. ``declared`` is true only when it was declared up front
    by ``supports(spec)`` / ``supports_run(layout, grads)`` before any work: the report shows such a row as
    *not applicable*. Raised from inside ``run`` after support was declared, it is not (the row fails: the
    implementation's declaration did not hold)."""

    def __init__(self, message: str, reason: str | None = None, *, declared: bool = False):
        super().__init__(message)
        self.reason = reason if reason is not None else message
        self.declared = declared


def _rank_as_dict(rank: int, world: int, impl: ImplementationUnderTest, *args) -> dict:
    """One forked rank: ``impl.run``, its :class:`RankResult` as plain containers for the trip back."""
    return impl.run(rank, world, *args).to_dict()


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
    impl: ImplementationUnderTest = OURS,
) -> ParityResult:
    """Build both models, run them on the same ids, compare, judge.

    ``layout`` runs our side with TP/CP/EP (forked gloo processes) and/or one packed row of documents; the
    reference always runs unsharded, a packed row one document at a time. ``impl`` is the model side
    (:class:`~harness.parity.impl.ImplementationUnderTest`; default: this repo's model).
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
    unsupported = impl.supports(spec)
    if unsupported is None and hasattr(impl, "for_source"):
        impl = impl.for_source(source)  # bound first, so supports_run can see the config
    if unsupported is None and hasattr(impl, "supports_run"):
        unsupported = impl.supports_run(layout, grads)
    if unsupported is not None:
        raise UnsupportedByImplementation(
            f"{impl.name} cannot run {source.label}: {unsupported}", unsupported, declared=True
        )
    validate_layout(spec, layout, batch, seq_len)
    # Nothing is allocated before the estimate: a config or flag asking for terabytes is refused (exit 2).
    forced = check_budget(
        estimate_run(spec, dtype, batch, seq_len, grads=grads, world_size=layout.world_size),
        force=force,
        what=f"parity {source.label} {str(dtype).removeprefix('torch.')} batch {batch} x seq {seq_len}",
    )
    source.materialize()
    tol = tolerance or tolerance_for(dtype)
    notes: list[str] = []
    if impl.name != OURS.name:
        notes.append(f"implementation under test: {impl.name} (precision {impl.precision})")
    if tolerance is None and dtype == torch.float64 and impl.precision == "fp32-islands":
        tol = FP64_FP32_ISLANDS
        notes.append(
            f"fp64 exact gate ({FP64_EXACT.activations_max_scaled:.0e}): not applicable: fp32 islands "
            f"({impl.name} declares precision fp32-islands); gated at {tol.name}"
        )

    # ---- the reference ----
    t0 = time.perf_counter()
    hf = build_reference_model(source.hf_config, dtype, seed=seed, weights=source.weights)
    hf_weights = hf_text_state_dict(hf)
    full_weights = hf_to_mcore(hf_weights, spec)
    ids = make_inputs(spec, batch, seq_len, seed)
    cu = cu_seqlens_of(list(layout.packed) if layout.packed else [seq_len])
    ref_logits, ref_acts = reference_side.run_reference(hf, ids, cu, bool(layout.packed), grads)
    reference_side.require_finite_reference(spec, ref_acts, source.label, dtype)
    # fp32: Megatron's packed GEMMs may sum in another order than HF's separate projections; bf16 stays
    # mirrored (bitwise) unless the layout, the MoE dispatcher or the implementation reorders sums (see
    # tolerances.reordered).
    reorders = layout.world_size > 1 or bool(layout.packed) or spec.enable_moe or impl.precision != "mirrored"
    if tolerance is None and (dtype == torch.float32 or (dtype == torch.bfloat16 and reorders)):
        noise = reference_side.reference_noise(source, dtype, seed, ids, cu, layout, ref_acts)
        tol = reordered(tol, *noise)
    ref_grads = reference_side.reference_grads(hf, hf_weights, spec, source.label) if grads else None
    ref_hf_grads = reference_side.reference_hf_grads(hf, hf_weights, source.label) if grads else None
    t_ref = time.perf_counter() - t0

    # ---- the implementation under test ----
    t1 = time.perf_counter()
    lengths = list(layout.packed) if layout.packed else [seq_len]
    seq = pad_sequences(ids, lengths, layout, spec.pad_token_id or 0)
    args = (spec, dtype, full_weights, seq, layout, ref_grads)
    if layout.world_size == 1:
        init_single_process()
        try:
            results = [impl.run(0, 1, *args)]
        except ImplementationBroken as exc:
            nan_logits = torch.full_like(ref_logits.detach(), float("nan"))
            return _broken(
                exc,
                spec,
                source=source.label,
                dtype=str(dtype).removeprefix("torch."),
                batch=batch,
                seq_len=seq_len,
                seed=seed,
                layout=layout,
                tolerance=tol,
                config=spec.to_json_dict(),
                notes=source.notes + ([forced] if forced else []) + notes,
                versions=software_versions(),
                tensors=ParityTensors(ids, cu if layout.packed else None, nan_logits, ref_logits.detach()),
                impl=impl.name,
            )
    else:
        par = Parallelism(
            tp=layout.tp, cp=layout.cp, ep=layout.ep, sequence_parallel=layout.sequence_parallel
        )
        deadline = {} if timeout is None else {"timeout": timeout}
        sent = run_distributed(_rank_as_dict, par, impl, *args, **deadline)
        results = [RankResult.from_dict(d) for d in sent]
    our_logits, our_acts = megatron_side._assemble(results, layout, seq)
    t_ours = time.perf_counter() - t1

    # ---- compare and judge ----
    order = capture_order(spec)
    not_captured = [p for p in order if p not in our_acts]
    if not_captured:
        notes.append(f"not captured by {impl.name} (not compared): {', '.join(not_captured)}")
    points = point_diffs(our_acts, ref_acts, [p for p in order if p in our_acts])
    stats = logit_stats(our_logits, ref_logits)
    grad_errors = None
    if grads:
        per_param: dict[str, dict[str, float]] = {}
        missing: list[tuple[str, str]] = []
        for r in results:
            missing += [(name, f"tp rank {r.tp_rank}, cp rank {r.cp_rank}") for name in r.missing_grads]
            for name, d in (r.grad_diffs or {}).items():
                key = name if layout.world_size == 1 else f"{name}@tp{r.tp_rank}cp{r.cp_rank}ep{r.ep_rank}"
                per_param[key] = d
        named = [r for r in results if r.hf_grads is not None]
        if named:  # HF-named gradients (the named-gradients hook): compared here, with HF's own
            d, m = hf_grad_diffs(named[0].hf_grads, ref_hf_grads)
            per_param.update(d)
            missing += m
            notes.append(f"gradients: {impl.name}'s, mapped back to HF names by the implementation")
        elif not per_param and not missing:
            missing.append(("(every parameter)", f"{impl.name} returned neither grad_diffs nor hf_grads"))
        grad_errors = GradientErrors(per_param, missing)
    verdict = judge(points, stats, tol, spec, grad_errors)

    return ParityResult(
        passed=verdict.passed,
        source=source.label,
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        layout=layout,
        logits=points["logits"],
        stats=stats,
        activations_max_scaled=verdict.activations_max_scaled,
        tolerance=tol,
        first_divergence=verdict.first_divergence,
        failures=verdict.failures,
        per_point=points,
        grads=grad_errors,
        config=spec.to_json_dict(),
        notes=source.notes + ([forced] if forced else []) + notes,
        timings_s={"reference": t_ref, "megatron": t_ours},
        versions=software_versions(),
        tensors=ParityTensors(
            input_ids=ids,
            cu_seqlens=cu if layout.packed else None,
            megatron_logits=our_logits.detach(),
            hf_logits=ref_logits.detach(),
        ),
        impl=impl.name,
    )


def hf_grad_diffs(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, float]], list[tuple[str, str]]]:
    """An implementation's HF-named gradients against HF's (:func:`~harness.parity.reference_side.
    reference_hf_grads`): ``{"max_abs", "ref_max_abs", "scaled"}`` per HF parameter (scaled as for our model:
    by ``max(ref_max_abs, GRAD_SCALE_FLOOR * largest reference gradient)``), and what cannot be compared as
    ``(name, why)``: an HF parameter it gave no gradient for, a name HF does not have, a shape that differs."""
    from harness.compare import tensor_diff
    from harness.tolerances import GRAD_SCALE_FLOOR

    floor = GRAD_SCALE_FLOOR * max((float(g.abs().max()) for g in ref.values() if g.numel()), default=0.0)
    diffs: dict[str, dict[str, float]] = {}
    missing = [(n, "not in its HF-named gradients") for n in ref if n not in ours]
    for name, g in ours.items():
        if name not in ref:
            missing.append((name, "its HF-named gradients have this name, HF has no such parameter"))
            continue
        if tuple(g.shape) != tuple(ref[name].shape):
            missing.append((name, f"shape {tuple(g.shape)}, HF's is {tuple(ref[name].shape)}"))
            continue
        d = tensor_diff(g, ref[name])
        diffs[name] = {
            "max_abs": d.max_abs,
            "ref_max_abs": d.ref_max_abs,
            "scaled": d.max_abs / max(d.ref_max_abs, floor, 1e-300),
        }
    return diffs, missing


def _broken(exc: ImplementationBroken, spec, **common) -> ParityResult:
    """A failed result for an implementation that could not build or load its model: nothing was compared
    (every metric NaN, so nothing can read as a pass); the first divergence is where it broke."""
    from harness.compare import LogitStats, TensorDiff
    from harness.parity.capture import describe_point

    nan = float("nan")
    where = describe_point(spec, exc.point) if exc.point else "model build"
    return ParityResult(
        passed=False,
        logits=TensorDiff(nan, nan, nan, ()),
        stats=LogitStats(nan, nan, nan, nan),
        activations_max_scaled=nan,
        first_divergence=where,
        failures=[f"{common['impl']} could not build or load the model at {where}: {exc}"],
        per_point={},
        grads=None,
        timings_s={},
        **common,
    )

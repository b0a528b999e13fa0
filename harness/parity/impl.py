"""The model side of a parity run behind a narrow interface: the implementation under test.

The pipeline (:func:`harness.parity.run.run_parity`) and the judge see an implementation only through
:class:`ImplementationUnderTest`: it is asked whether it supports a spec, then run once per rank (forked
gloo ranks under TP/CP/EP, or the single process) and answers with a :class:`RankResult`. Rank results are
assembled into full-sequence tensors by :func:`harness.parity.megatron_side._assemble` (Megatron's TP/CP/DP
layout), compared with the reference and judged by :mod:`harness.parity.judge` the same way for every
implementation. :data:`OURS` (this repo's Megatron-Core Gemma 4) is the default; others are passed as
``impl=`` (named ones and ``module:attr`` loading: :func:`harness.impls.resolve_impl`, ``--impl``).

Two optional methods, looked up with ``getattr`` by :func:`harness.parity.run.run_parity`:
``for_source(source) -> impl`` (the implementation bound to the run's :class:`~harness.parity.source.
ParitySource`, e.g. to write the HF ``config.json`` its provider reads; called before ``supports_run``) and
``supports_run(layout, grads) -> str | None`` (a reason it cannot run this layout or compare gradients; exit
2 before any work). A reason from ``supports`` / ``supports_run`` is *declared*: the report shows such a row
as not applicable; an implementation that declares support and then fails or refuses fails the run.
An implementation may capture a subset of :func:`harness.parity.capture.capture_order`: the points it does
not report are listed as not captured in the result's notes, never compared as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from gemma4.config import Gemma4TextSpec
    from harness.parity.inputs import SequencePadding
    from harness.parity.layout import RunLayout

#: ``mirrored``: op for op the reference's math in the run dtype, so a single-process bf16 run is gated at
#: the mirrored (bitwise-level) bounds and only layouts that reorder sums (TP, CP, packed, MoE) get the
#: reference-noise floor; ``reordered``: sums in its own order (fused kernels...), so every fp32 / bf16 run
#: gets the noise floor (:func:`harness.tolerances.reordered`). fp64 is gated at the exact bounds either way,
#: except ``fp32-islands``: parts of the computation (norms, RoPE tables...) stay in fp32 inside an fp64 run,
#: so the fp64 exact gate (1e-9) is not applicable: an fp64 run is gated at
#: :data:`harness.tolerances.FP64_FP32_ISLANDS` and says so; fp32 / bf16 runs are gated as ``reordered``.
Precision = Literal["mirrored", "reordered", "fp32-islands"]
PRECISIONS: tuple[str, ...] = ("mirrored", "reordered", "fp32-islands")


class ImplementationBroken(Exception):
    """The implementation under test cannot build or load the model for a config it claims to support (its
    own defect, not invalid input): parity fails (exit 1) with ``point`` (a capture point name, e.g.
    ``layer.6.attention``) as the first divergence."""

    def __init__(self, message: str, point: str | None = None):
        super().__init__(message)
        self.point = point


@dataclass
class RankResult:
    """What one rank of the implementation hands back: its local activations (``[b, s_local, h]`` at the
    capture points of :func:`harness.parity.capture.capture_order`) and logits, where it sits in the
    layout, and, when gradients are compared, either

    * ``grad_diffs``: each local parameter's gradient error against the reference (``{"max_abs",
      "ref_max_abs", "scaled"}``, measured by the implementation against the ``ref_grads`` it was given; what
      :data:`OURS` does per TP/EP shard), or
    * ``hf_grads``: its gradients mapped back to **HF names** (relative to ``model.``, as
      :func:`harness.reference.hf_text_state_dict` names them; full, unsharded tensors), which the pipeline
      compares with HF's own gradients (:func:`harness.parity.run.hf_grad_diffs`) and judges like any other:
      the implementation never grades itself. A sharded implementation returns them on one rank only.

    and ``missing_grads``: the parameters that got no gradient."""

    tp_rank: int
    cp_rank: int
    dp_rank: int
    ep_rank: int
    acts: dict[str, torch.Tensor]
    logits: torch.Tensor
    grad_diffs: dict[str, dict[str, float]] | None = None
    missing_grads: list[str] = field(default_factory=list)
    hf_grads: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, for the trip from a forked rank (:func:`harness.distributed.run_distributed`
        loads results with ``torch.load(weights_only=True)``: tensors, numbers, strings, containers)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankResult:
        return cls(**d)


@runtime_checkable
class ImplementationUnderTest(Protocol):
    """A Megatron-side implementation of Gemma 4 that parity can compare with the HF reference."""

    name: str
    precision: Precision

    def supports(self, spec: Gemma4TextSpec) -> str | None:
        """``None`` if the implementation can run ``spec``, else the reason it cannot (exit 2)."""
        ...

    def run(
        self,
        rank: int,
        world: int,
        spec: Gemma4TextSpec,
        dtype: torch.dtype,
        full_weights: dict[str, torch.Tensor],
        seq: SequencePadding,
        layout: RunLayout,
        ref_grads: dict[str, torch.Tensor] | None,
    ) -> RankResult:
        """Build the model for ``layout`` on this rank, load ``full_weights`` (TP = 1 Megatron names and
        shapes of the unpadded spec), run the forward on ``seq`` capturing activations, and with
        ``ref_grads`` (same naming) backpropagate :func:`harness.parity.inputs.lm_loss` and either measure
        each gradient against the reference's (``grad_diffs``) or hand its gradients back under HF names
        (``hf_grads``: the named-gradients hook, compared by the pipeline; see :class:`RankResult`)."""
        ...


@dataclass(frozen=True)
class OurMegatronGemma4:
    """This repo's model (:mod:`gemma4.model`): :func:`harness.parity.megatron_side.run_megatron_rank`."""

    name: str = "gemma4-mcore"
    precision: Precision = "mirrored"

    def supports(self, spec: Gemma4TextSpec) -> str | None:
        # Every spec gemma4.config accepts is buildable; layouts it cannot run are refused by
        # harness.parity.layout.validate_layout.
        return None

    def run(
        self,
        rank: int,
        world: int,
        spec: Gemma4TextSpec,
        dtype: torch.dtype,
        full_weights: dict[str, torch.Tensor],
        seq: SequencePadding,
        layout: RunLayout,
        ref_grads: dict[str, torch.Tensor] | None,
    ) -> RankResult:
        from harness.parity import megatron_side  # looked up per call, so tests can patch it

        return megatron_side.run_megatron_rank(rank, world, spec, dtype, full_weights, seq, layout, ref_grads)


OURS = OurMegatronGemma4()

"""Step 7, what a parity run returns: :class:`ParityResult`, typed, with its JSON form (:meth:`to_json`),
its text summary (:meth:`summary`) and the tensors a dump or a report needs (:class:`ParityTensors`),
kept apart from the JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.compare import LogitStats, TensorDiff
from harness.parity.judge import GradientErrors
from harness.parity.layout import RunLayout
from harness.tolerances import Tolerance

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ParityTensors:
    """The run's inputs and both sides' logits (run dtype): ``--dump`` writes them, the report compares
    layouts with them. ``cu_seqlens`` only for a packed row."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    megatron_logits: torch.Tensor
    hf_logits: torch.Tensor


@dataclass(frozen=True)
class ParityResult:
    """One parity run: the implementation under test (``impl``, its name: ``gemma4-mcore`` is ours) against
    the reference, judged (:mod:`harness.parity.judge`). The summary and the JSON name ``impl``, so a plugin's
    result is never read as ours."""

    passed: bool
    source: str
    dtype: str
    batch: int
    seq_len: int
    seed: int
    layout: RunLayout
    logits: TensorDiff
    stats: LogitStats
    activations_max_scaled: float
    tolerance: Tolerance
    first_divergence: str | None
    failures: list[str]
    per_point: dict[str, TensorDiff]
    grads: GradientErrors | None
    config: dict[str, Any]
    notes: list[str]
    timings_s: dict[str, float]
    versions: dict[str, str]
    tensors: ParityTensors = field(repr=False)
    impl: str = "gemma4-mcore"

    @property
    def exact_fp64_reference(self) -> bool:
        return self.dtype == "float64"

    @property
    def exit_code(self) -> int:
        """The CLI's code (:mod:`harness.exit_codes`): 0 parity holds, 1 it does not."""
        from harness.exit_codes import EXIT_FAILED, EXIT_OK

        return EXIT_OK if self.passed else EXIT_FAILED

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON types (no tensors; non-finite floats stay floats, which
        :func:`gemma4.atomic_io.atomic_write_json` writes as strings)."""
        lay = self.layout
        return {
            "pass": self.passed,
            "impl": self.impl,
            "source": self.source,
            "dtype": self.dtype,
            "exact_fp64_reference": self.exact_fp64_reference,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "layout": {
                "name": lay.name,
                "tp": lay.tp,
                "cp": lay.cp,
                "sequence_parallel": lay.sequence_parallel,
                "packed": list(lay.packed) if lay.packed else None,
            },
            "metrics": {
                "logits": self.logits.to_json(),
                "kl_mean": self.stats.kl_mean,
                "kl_max": self.stats.kl_max,
                "argmax_agreement": self.stats.argmax_agreement,
                "max_abs_logprob": self.stats.max_abs_logprob,
                "activations_max_scaled": self.activations_max_scaled,
                "grads_max_scaled": self.grads.max_scaled if self.grads else None,
            },
            "tolerance": self.tolerance.to_json(),
            "first_divergence": self.first_divergence,
            "failures": list(self.failures),
            "per_point": {name: d.to_json() for name, d in self.per_point.items()},
            "grads": self.grads.to_json() if self.grads else None,
            "config": self.config,
            "notes": list(self.notes),
            "timings_s": dict(self.timings_s),
            "versions": dict(self.versions),
        }

    def __getitem__(self, key: str) -> Any:
        """Read access by JSON key (``result["pass"]``), for code written against the former dict result."""
        return self.to_json()[key]

    def summary(self) -> str:
        """A short human-readable report (what ``gemma4-harness parity`` prints)."""
        lg, st, tol = self.logits, self.stats, self.tolerance
        lines = [
            f"parity {self.source}  impl={self.impl}  dtype={self.dtype}  layout={self.layout.name}"
            f"  batch={self.batch} seq={self.seq_len}  seed={self.seed}  tolerance={tol.name}",
            f"  checked     {self.impl} against HF transformers (the oracle)",
            f"  logits      max|d|={lg.max_abs:.3e} (<= {tol.logits_max_abs:.0e})  max rel={lg.max_rel:.3e}",
            f"  activations max scaled={self.activations_max_scaled:.3e} (<= {tol.activations_max_scaled:.0e})",
            f"  log-probs   KL mean={st.kl_mean:.3e} max={st.kl_max:.3e}  argmax agreement="
            f"{st.argmax_agreement:.4f}  max|d logprob|={st.max_abs_logprob:.3e}",
        ]
        if self.grads is not None:
            lines.append(
                f"  gradients   max scaled={self.grads.max_scaled:.3e}  (worst: {self.grads.worst_parameter})"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.passed:
            lines.append("PASS")
        else:
            lines.append(f"FAIL: first divergence at {self.first_divergence}")
            lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)

"""Step 6, the one judge: per-point errors, logit statistics and gradient errors against a
:class:`~harness.tolerances.Tolerance` become failures and the first divergence.

Used by ``run_parity`` (ours vs HF), the ``forward`` goldens (ours or HF vs a golden) and, through
:class:`~harness.parity.result.ParityResult`, the report. Every bound is checked as ``not (x <= bound)``, so
a NaN error is a failure, never a pass; the worst value of a set is NaN if any value is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.compare import LogitStats, TensorDiff
from harness.parity.capture import describe_point
from harness.tolerances import Tolerance

if TYPE_CHECKING:
    import torch


def point_diffs(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], points: Iterable[str]
) -> dict[str, TensorDiff]:
    """:func:`harness.compare.tensor_diff` at each capture point, in the order given (forward order)."""
    from harness.compare import tensor_diff

    return {name: tensor_diff(ours[name], ref[name]) for name in points}


def worst(values: Iterable[float]) -> float:
    """The largest value, NaN if any is NaN (``max`` alone would skip it), 0.0 for none."""
    vals = list(values)
    if not vals:
        return 0.0
    return next((v for v in vals if v != v), max(vals))


@dataclass(frozen=True)
class GradientErrors:
    """Gradient errors of every parameter (``{"max_abs", "ref_max_abs", "scaled"}`` per key) and the
    parameters that got no gradient, as ``(name, where)`` (e.g. ``("decoder...", "tp rank 0, cp rank 0")``)."""

    per_parameter: dict[str, dict[str, float]]
    missing: list[tuple[str, str]] = field(default_factory=list)

    @property
    def worst_parameter(self) -> str | None:
        p = self.per_parameter
        if not p:
            return None
        return next((n for n in p if p[n]["scaled"] != p[n]["scaled"]), None) or max(
            p, key=lambda n: p[n]["scaled"]
        )

    @property
    def max_scaled(self) -> float:
        name = self.worst_parameter
        return self.per_parameter[name]["scaled"] if name else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "max_scaled": self.max_scaled,
            "worst_parameter": self.worst_parameter,
            "per_parameter": self.per_parameter,
        }


@dataclass(frozen=True)
class Verdict:
    """What the judge decided.

    ``first_divergence``: where it first went wrong, for people (``layer 3 (full_attention) mlp``,
    ``gradient of X``, ``logits``); ``first_bad``: the first failing check with its numbers
    (``layer 3 (full_attention) mlp (scaled error 1.20e-03 > 1e-09)``); ``per_point``: the gated value at
    each point (max abs for logits, scaled error elsewhere).
    """

    failures: list[str]
    first_divergence: str | None
    first_bad: str | None
    per_point: dict[str, float]
    activations_max_scaled: float

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(
    points: dict[str, TensorDiff],
    stats: LogitStats,
    tol: Tolerance,
    spec: Any,
    grads: GradientErrors | None = None,
) -> Verdict:
    """Judge ``points`` (capture point -> error, in forward order; ``logits`` gated on max abs, the others on
    scaled error), the logit statistics and optionally the gradient errors against ``tol``."""
    per_point: dict[str, float] = {}
    first_point = first_bad = None
    for name, d in points.items():
        if name == "logits":
            value, bound, what = d.max_abs, tol.logits_max_abs, "max|d|"
        else:
            value, bound, what = d.scaled, tol.activations_max_scaled, "scaled error"
        per_point[name] = value
        if first_point is None and not value <= bound:
            first_point = describe_point(spec, name)
            first_bad = f"{first_point} ({what} {value:.2e} > {bound:.0e})"
    activations = worst(v for n, v in per_point.items() if n != "logits")

    failures: list[str] = []
    if "logits" in points and not points["logits"].max_abs <= tol.logits_max_abs:
        failures.append(f"logits max abs {points['logits'].max_abs:.3e} > {tol.logits_max_abs:.0e}")
    if not activations <= tol.activations_max_scaled:
        failures.append(f"activations max scaled error {activations:.3e} > {tol.activations_max_scaled:.0e}")
    if tol.kl_max is not None and not stats.kl_mean <= tol.kl_max:
        failures.append(f"mean KL {stats.kl_mean:.3e} > {tol.kl_max:.0e}")
        first_bad = first_bad or f"logits (mean KL {stats.kl_mean:.2e} > {tol.kl_max:.0e})"
    if tol.argmax_min is not None and not stats.argmax_agreement >= tol.argmax_min:
        failures.append(f"argmax agreement {stats.argmax_agreement:.3f} < {tol.argmax_min}")
        first_bad = first_bad or f"logits (argmax agreement {stats.argmax_agreement:.3f} < {tol.argmax_min})"

    first_divergence = first_point
    if grads is not None:
        for name, where in grads.missing:
            failures.append(f"parameter {name} got no gradient ({where})")
        name, value = grads.worst_parameter, grads.max_scaled
        if tol.grads_max_scaled is not None and not value <= tol.grads_max_scaled:
            failures.append(f"gradient of {name}: scaled error {value:.3e} > {tol.grads_max_scaled:.0e}")
            first_divergence = first_divergence or f"gradient of {name}"
        first_bad = first_bad or next(
            (f for f in failures if f.startswith(("parameter ", "gradient "))), None
        )
    if first_divergence is None and failures:
        first_divergence = "logits"
    return Verdict(
        failures, first_divergence, first_bad or (failures[0] if failures else None), per_point, activations
    )

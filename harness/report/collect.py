"""Collect what a report shows: parity per preset x dtype x layout, layout equivalence, the goldens check."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.goldens.progress import progress

if TYPE_CHECKING:
    from harness.parity.impl import ImplementationUnderTest
    from harness.parity.result import ParityResult


def shorten(text: str, limit: int = 400) -> str:
    """``text`` cut to ``limit`` characters for tables and summaries (results.json keeps it whole)."""
    return text if len(text) <= limit else text[: limit - 25] + f" ... [{len(text) - limit + 25} more chars]"


@dataclass
class ParityRow:
    """One ``run_parity`` run: the implementation under test vs HF for a preset, dtype and parallel layout.

    A row is one of: run (``result``; passed or failed), errored (``error``: failed), or *not applicable*
    (``not_applicable``: the implementation declared up front, through ``supports`` / ``supports_run``, that
    it cannot run this config or layout; the reason is its own). A not-applicable row is shown and counted,
    but is neither a pass nor a failure."""

    preset: str
    dtype: str
    layout: str
    result: ParityResult | None = None  # read by JSON key (``result["metrics"]``) in render and plots
    error: str | None = None  # the run raised instead of returning
    not_applicable: str | None = None  # the implementation's declared reason it cannot run this row
    per_position: list[float] = field(default_factory=list)  # logits max|ours - HF| per token position
    logits: torch.Tensor | None = None  # ours, kept for the layout-equivalence comparison
    input_ids: torch.Tensor | None = None
    sliding_window: int | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.result is not None and bool(self.result["pass"])

    @property
    def status(self) -> str:
        """``PASS``, ``FAIL`` or ``n/a`` (not applicable: never counted as a failure)."""
        if self.not_applicable is not None and self.error is None and self.result is None:
            return "n/a"
        return "PASS" if self.passed else "FAIL"

    def result_json(self) -> dict[str, Any] | None:
        """The parity result's JSON form (``results.json``)."""
        r = self.result
        return r.to_json() if hasattr(r, "to_json") else r

    def to_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "dtype": self.dtype,
            "layout": self.layout,
            "pass": None if self.status == "n/a" else self.passed,
            "status": self.status,
            "error": self.error,
            "not_applicable": self.not_applicable,
            "per_position": self.per_position,
            "sliding_window": self.sliding_window,
            "result": self.result_json(),
        }


@dataclass
class EquivalenceRow:
    """A layout's logits against the baseline layout's (same preset, dtype, inputs)."""

    preset: str
    dtype: str
    layout: str
    baseline: str
    max_abs: float | None
    bound: float
    per_position: list[float] = field(default_factory=list)
    error: str | None = None
    not_comparable: str | None = None  # e.g. a packed layout runs other inputs: shown, not gated

    @property
    def passed(self) -> bool:
        if self.not_comparable is not None:
            return self.error is None
        return self.error is None and self.max_abs is not None and self.max_abs <= self.bound

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "pass": self.passed}


@dataclass
class ReportData:
    """Everything one report renders."""

    rows: list[ParityRow]
    equivalence: list[EquivalenceRow]
    layouts: list[dict[str, Any]]
    goldens: Any | None  # harness.goldens.check.CheckReport, or None when skipped
    settings: dict[str, Any]
    versions: dict[str, str]
    created_at: str
    tolerances: list[dict[str, Any]]

    @property
    def failures(self) -> list[str]:
        """One line per failing row, equivalence or golden."""
        out = []
        for r in self.rows:
            if r.status == "FAIL":
                why = r.error if r.result is None else "; ".join(r.result["failures"])
                out.append(f"parity {r.preset} {r.dtype} {r.layout}: {why}")
        for e in self.equivalence:
            if not e.passed:
                out.append(
                    f"equivalence {e.preset} {e.dtype} {e.layout} vs {e.baseline}: {e.error or e.max_abs}"
                )
        if self.goldens is not None:
            out += [f"golden {o.case}: {o.status}: {o.message}" for o in self.goldens.outcomes if not o.ok]
        return [shorten(line) for line in out]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def not_applicable(self) -> list[ParityRow]:
        """The parity rows the implementation under test declared it cannot run."""
        return [r for r in self.rows if r.status == "n/a"]

    @property
    def impl(self) -> str:
        """The name of the implementation under test (``gemma4-mcore``: ours)."""
        return str(self.settings.get("impl", "gemma4-mcore"))


def per_position_error(ours: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """``max |ours - ref|`` over batch and vocabulary, per token position (``[b, s, V]`` logits)."""
    diff = (ours.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
    return [float(x) for x in diff.amax(dim=(0, 2))]


def run_row(
    preset: str,
    dtype: str,
    layout: dict[str, Any],
    batch: int,
    seq_len: int,
    seed: int,
    timeout: float | None = None,
    impl: ImplementationUnderTest | None = None,
) -> ParityRow:
    """One parity run. Anything it raises (a preset the model refuses, a layout that does not fit the preset,
    a crash) becomes the row's error: the report goes on and the row fails. ``impl``: the implementation
    under test (default ours); one that declares it cannot run the preset or layout gives a not-applicable
    row with its reason (not a failure)."""
    from harness.parity import DTYPES, resolve_source, run_parity
    from harness.parity.impl import OURS
    from harness.parity.run import UnsupportedByImplementation

    row = ParityRow(preset, dtype, layout["name"])
    try:
        source = resolve_source(preset=preset)
        row.sliding_window = source.spec.sliding_window
        result = run_parity(
            source,
            DTYPES[dtype],
            batch=batch,
            seq_len=seq_len,
            seed=seed,
            grads=False,
            timeout=timeout,
            impl=impl or OURS,
            **layout["kwargs"],
        )
    except UnsupportedByImplementation as exc:
        if exc.declared:  # declared up front by supports()/supports_run(): not applicable, not a failure
            row.not_applicable = exc.reason
        else:  # refused after declaring support: its declaration did not hold
            row.error = f"unsupported after declaring support: {exc}"
        return row
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    row.result = result
    row.logits = result.tensors.megatron_logits
    row.input_ids = result.tensors.input_ids
    row.per_position = per_position_error(result.tensors.megatron_logits, result.tensors.hf_logits)
    return row


def equivalence_rows(rows: list[ParityRow], baseline: str) -> list[EquivalenceRow]:
    """Every non-baseline layout's logits against the baseline's, on the same inputs.

    The bound is the dtype's logits bound, widened to the layout row's own parity bound where that is wider
    (the tolerance policy's allowance for layouts that reorder reductions); a layout bug is orders of
    magnitude above either. Rows whose inputs differ from the baseline's (packed documents) are listed as
    not comparable: their parity against HF is in the parity table.
    """
    from harness.parity import DTYPES
    from harness.tolerances import tolerance_for

    base = {(r.preset, r.dtype): r for r in rows if r.layout == baseline}
    out = []
    for r in rows:
        if r.layout == baseline:
            continue
        bound = tolerance_for(DTYPES[r.dtype]).logits_max_abs
        if r.result is not None:
            bound = max(bound, float(r.result["tolerance"]["logits_max_abs"]))
        b = base.get((r.preset, r.dtype))
        na = r.not_applicable if r.not_applicable is not None else (b.not_applicable if b else None)
        if na is not None:  # nothing to compare: not applicable, not a failure
            why = f"not applicable: {na}"
            out.append(EquivalenceRow(r.preset, r.dtype, r.layout, baseline, None, bound, not_comparable=why))
            continue
        if r.logits is None or b is None or b.logits is None:
            why = r.error or (b.error if b else None) or "baseline not run"
            out.append(EquivalenceRow(r.preset, r.dtype, r.layout, baseline, None, bound, error=why))
            continue
        if r.input_ids is None or b.input_ids is None or not torch.equal(r.input_ids, b.input_ids):
            why = "inputs differ from the baseline's (e.g. packed documents): compared with HF only"
            out.append(EquivalenceRow(r.preset, r.dtype, r.layout, baseline, None, bound, not_comparable=why))
            continue
        per_pos = per_position_error(r.logits, b.logits)
        out.append(EquivalenceRow(r.preset, r.dtype, r.layout, baseline, max(per_pos), bound, per_pos))
    return out


def _always(preset: str) -> bool:
    return True


def collect(
    presets: list[str],
    dtypes: list[str],
    layouts: list[dict[str, Any]],
    *,
    batch: int,
    seq_len: int,
    seed: int,
    goldens_dir: Path | None,
    goldens_only: list[str] | None = None,
    show_progress: bool | None = None,
    timeout: float | None = None,
    impl: ImplementationUnderTest | None = None,
) -> ReportData:
    """Run everything the report needs."""
    from harness.goldens.store import producer_versions
    from harness.parity import DTYPES
    from harness.tolerances import tolerance_for

    # A layout may apply to some presets only (e.g. expert parallelism needs experts).
    grid = [(p, d, lay) for p in presets for d in dtypes for lay in layouts if lay.get("applies", _always)(p)]
    rows = [
        run_row(p, d, lay, batch, seq_len, seed, timeout, impl)
        for p, d, lay in progress(grid, "parity runs", show_progress, total=len(grid))
    ]
    equivalence = equivalence_rows(rows, layouts[0]["name"])
    goldens = None
    if goldens_dir is not None:
        from harness.goldens.check import check_goldens

        goldens = check_goldens(goldens_dir, goldens_only, show_progress)
    return ReportData(
        rows=rows,
        equivalence=equivalence,
        layouts=layouts,
        goldens=goldens,
        settings={
            "presets": presets,
            "dtypes": dtypes,
            "batch": batch,
            "seq_len": seq_len,
            "seed": seed,
            "impl": (impl.name if impl is not None else "gemma4-mcore"),
        },
        versions=producer_versions(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        tolerances=[tolerance_for(DTYPES[d]).to_json() for d in dtypes],
    )

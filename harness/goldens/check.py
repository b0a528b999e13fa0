"""``goldens check``: recompute every selected case with our model and with HF, judge both against the golden.

See :mod:`harness.goldens.outcome` for the statuses and exit codes. Besides the per-case outcomes, the report
notes producer-version differences from the manifest, files no case references, and the size of the goldens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4.errors import InvalidInputError
from harness.goldens.outcome import INTEGRITY, LABELS, REGRESSION, Outcome, exit_code, worst_status
from harness.goldens.progress import progress
from harness.goldens.registry import PENDING, all_cases, family, select
from harness.goldens.store import (
    MANIFEST,
    SIZE_BUDGET_BYTES,
    GoldenError,
    producer_versions,
    read_case_files,
    read_manifest,
    stray_files,
    total_size,
)

_VERSION_KEYS = ("python", "torch", "transformers", "megatron-core", "platform")


@dataclass
class CheckReport:
    """Every outcome of a ``goldens check`` run, notes, and the exit code."""

    goldens_dir: Path
    outcomes: list[Outcome]
    notes: list[str] = field(default_factory=list)
    size_bytes: int = 0

    @property
    def exit_code(self) -> int:
        return exit_code(self.outcomes)

    @property
    def status(self) -> str:
        return worst_status(self.outcomes)

    def to_json(self) -> dict[str, Any]:
        """JSON form for reports."""
        return {
            "goldens_dir": str(self.goldens_dir),
            "status": self.status,
            "exit_code": self.exit_code,
            "size_bytes": self.size_bytes,
            "notes": self.notes,
            "outcomes": [o.to_json() for o in self.outcomes],
        }


def _version_notes(entries: dict[str, Any]) -> list[str]:
    now = producer_versions()
    differing: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, entry in entries.items():
        producer = entry.get("producer") if isinstance(entry, dict) else None
        for key in _VERSION_KEYS:
            recorded = producer.get(key) if isinstance(producer, dict) else None
            if recorded != now[key]:
                differing[(key, str(recorded))].append(name)
    return [
        f"version difference: {key} recorded {recorded}, now {now[key]} ({len(names)} case(s), e.g. {names[0]})"
        for (key, recorded), names in sorted(differing.items())
    ]


def validate_recorded_config(entry: Any, case_name: str, goldens_dir: Path, force: bool = False) -> None:
    """The config a golden was recorded with must be a valid Gemma 4 config whose run fits in memory;
    otherwise the golden is broken (exit 4), not a regression of our model (exit 1). Raises GoldenError."""
    from gemma4.config import text_spec_from_any
    from harness.budget import check_budget, estimate_run

    where = f"{goldens_dir / MANIFEST}: case {case_name!r}"
    config = entry.get("config") if isinstance(entry, dict) else None
    if config is None:
        return  # families without a model config (chat) validate their own entries
    if not isinstance(config, dict):
        raise GoldenError(f"{where}: recorded 'config' is not an object")
    try:
        spec = text_spec_from_any(dict(config))
    except InvalidInputError as exc:
        raise GoldenError(f"{where}: recorded config is invalid: {exc}") from None
    inputs = entry.get("inputs") if isinstance(entry.get("inputs"), dict) else {}
    batch, seq = inputs.get("batch", 2), inputs.get("seq_len", 24)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (batch, seq)):
        raise GoldenError(f"{where}: recorded inputs batch/seq_len must be positive integers")
    try:
        check_budget(estimate_run(spec, "float64", batch, seq, grads=True), force=force, what=where)
    except InvalidInputError as exc:
        raise GoldenError(str(exc)) from None


def check_entry(case, entry, goldens_dir: Path, force: bool = False) -> Outcome:
    """The outcome of one case given its manifest entry (``None``: not recorded)."""
    if entry is None:
        return Outcome(
            case.name,
            INTEGRITY,
            f"{goldens_dir / MANIFEST}: no golden recorded for case {case.name!r} "
            f"(record it with `gemma4-harness goldens record --only {case.name}`)",
        )
    try:
        validate_recorded_config(entry, case.name, goldens_dir, force)
        files = read_case_files(goldens_dir, case.name, entry)
        return family(case.family).check(case, entry, files, goldens_dir)
    except (GoldenError, InvalidInputError) as exc:
        return Outcome(case.name, INTEGRITY, str(exc))
    except Exception as exc:  # a crash while recomputing is a failure of ours to report, not to hide
        return Outcome(case.name, REGRESSION, f"checking crashed: {type(exc).__name__}: {exc}")


def check_goldens(
    goldens_dir: Path,
    only: list[str] | None = None,
    show_progress: bool | None = None,
    force: bool = False,
) -> CheckReport:
    """Check the selected goldens in ``goldens_dir`` (all by default)."""
    goldens_dir = Path(goldens_dir)
    cases = select(only)
    notes: list[str] = []
    try:
        manifest = read_manifest(goldens_dir)
    except GoldenError as exc:
        return CheckReport(goldens_dir, [Outcome(c.name, INTEGRITY, str(exc)) for c in cases], notes)

    entries = manifest["cases"]
    outcomes = [
        check_entry(case, entries.get(case.name), goldens_dir, force)
        for case in progress(cases, "checking goldens", show_progress)
    ]

    notes += _version_notes({c.name: entries[c.name] for c in cases if c.name in entries})
    known = {c.name for c in all_cases()}
    notes += [
        f"{goldens_dir / MANIFEST}: golden for unknown case {n!r} is not checked"
        for n in entries
        if n not in known
    ]
    notes += [
        f"{goldens_dir / rel}: stray file, no case references it"
        for rel in stray_files(goldens_dir, manifest)
    ]
    notes += [f"pending family {name}: {why}" for name, why in PENDING.items()]
    size = total_size(goldens_dir)
    notes.append(f"goldens: {size / 1e6:.2f} MB of the {SIZE_BUDGET_BYTES / 2**20:.0f} MiB budget")
    if size > SIZE_BUDGET_BYTES:
        notes.append(f"{goldens_dir}: OVER the size budget")
    return CheckReport(goldens_dir, outcomes, notes, size)


def check_case(goldens_dir: Path, name: str, force: bool = False) -> Outcome:
    """The outcome of the one case called ``name`` (what the per-case pytest gate runs)."""
    goldens_dir = Path(goldens_dir)
    case = next((c for c in all_cases() if c.name == name), None)
    if case is None:
        raise InvalidInputError(f"{name!r} is not a golden case")
    try:
        manifest = read_manifest(goldens_dir)
    except GoldenError as exc:
        return Outcome(name, INTEGRITY, str(exc))
    return check_entry(case, manifest["cases"].get(name), goldens_dir, force)


def gate_case(goldens_dir: Path, name: str, update: bool = False) -> tuple[str, str]:
    """The per-case test gate: ``("pass" | "skip" | "fail", message)`` for the case called ``name``.

    ``skip``: reference data the case needs is unavailable (the message says how to provide it). ``fail``:
    the outcome's message and details. With ``update``, a failing case is first re-recorded through
    :func:`harness.goldens.record.record_goldens` (atomic, with provenance) and the message says so: the test
    fails once, so that the rewrite is seen and reviewed. Without ``update`` nothing is written.
    """
    from harness.goldens.outcome import UNAVAILABLE
    from harness.goldens.record import record_goldens

    outcome = check_case(goldens_dir, name)
    if outcome.ok:
        return "pass", outcome.message
    if outcome.status == UNAVAILABLE:
        return "skip", f"{name}: {outcome.message}"
    detail = "\n".join([f"{name}: {outcome.status}: {outcome.message}", *outcome.details[:10]])
    if not update:
        return "fail", detail
    lines = record_goldens(
        goldens_dir, [name], update=True, command="pytest --goldens-update", show_progress=False
    )
    return "fail", "\n".join(
        [f"golden {name} rewritten; review the diff and rerun", *lines, f"was: {detail}"]
    )


def format_check(report: CheckReport) -> str:
    """The human-readable check report (one line per case, details indented, notes, verdict)."""
    width = max((len(o.case) for o in report.outcomes), default=10)
    lines = [f"goldens check: {report.goldens_dir}"]
    for o in report.outcomes:
        lines.append(f"  {LABELS[o.status]:<13} {o.case:<{width}}  {o.message}")
        lines += [f"  {'':<13} {'':<{width}}    {d}" for d in o.details[:10]]
    lines += [f"  note: {n}" for n in report.notes]
    counts = defaultdict(int)
    for o in report.outcomes:
        counts[o.status] += 1
    summary = ", ".join(f"{n} {LABELS[s].lower()}" for s, n in sorted(counts.items()))
    verdict = {
        0: "OK",
        1: "FAILED: regression: our code no longer reproduces a golden that HF still reproduces",
        3: "HF DRIFT: the reference moved; our model did not regress. Review, then re-record with --update",
        4: "FAILED: a golden is missing, corrupt or unreadable, or reference data it needs is unavailable",
    }[report.exit_code]
    lines.append(f"{verdict} ({summary}; exit {report.exit_code})")
    return "\n".join(lines)

"""What checking one golden case can conclude, and the exit code of ``goldens check``.

Every case compares three things: our Megatron model *now*, HF transformers *now* and the golden (what HF
computed when it was recorded).

=========  ============================================================================  =====
status     meaning                                                                        exit
=========  ============================================================================  =====
pass       ours matches the golden and so does HF                                          0
regression ours no longer matches the golden (whatever HF does): our model moved           1
hf-drift   ours matches the golden but HF does not (HF moved), or ours and HF moved        3
           together and still agree with each other (a shared dependency or the
           reference builder moved): review, then re-record with ``--update``
integrity  the golden is missing, corrupt (sha256), unreadable or of an unknown schema     4
unavail-   reference data the check needs is not on this machine (the released chat       4
able       templates under ``shared/``): the case cannot be checked, which is never a pass;
           the message says how to provide it (leave the cases out with ``--only``)
=========  ============================================================================  =====

Exit 2 stays what it is everywhere in the CLI: invalid input (an unknown ``--only`` case, a bad flag).
When cases end differently, the most severe wins: 4, then 1, then 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.exit_codes import (  # noqa: F401 - re-exported for the goldens command
    EXIT_FAILED,
    EXIT_GOLDEN_BROKEN,
    EXIT_HF_DRIFT,
    EXIT_INVALID_INPUT,
    EXIT_OK,
)

PASS = "pass"
REGRESSION = "regression"
HF_DRIFT = "hf-drift"
INTEGRITY = "integrity"
UNAVAILABLE = "unavailable"

# The CLI's one exit-code table (harness.exit_codes): a regression is the "check failed" code.
EXIT_REGRESSION = EXIT_FAILED

EXIT_CODES = {
    PASS: EXIT_OK,
    REGRESSION: EXIT_REGRESSION,
    HF_DRIFT: EXIT_HF_DRIFT,
    INTEGRITY: EXIT_GOLDEN_BROKEN,
    UNAVAILABLE: EXIT_GOLDEN_BROKEN,
}
_SEVERITY = (INTEGRITY, UNAVAILABLE, REGRESSION, HF_DRIFT, PASS)

LABELS = {
    PASS: "ok",
    REGRESSION: "REGRESSION",
    HF_DRIFT: "HF DRIFT",
    INTEGRITY: "BROKEN GOLDEN",
    UNAVAILABLE: "UNAVAILABLE",
}


@dataclass
class Outcome:
    """The verdict on one case: a status, one summary line, detail lines, and numbers for reports."""

    case: str
    status: str
    message: str
    details: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == PASS

    def to_json(self) -> dict[str, Any]:
        """JSON form for reports."""
        return {
            "case": self.case,
            "status": self.status,
            "message": self.message,
            "details": self.details,
            "metrics": self.metrics,
        }


def worst_status(outcomes: list[Outcome]) -> str:
    """The most severe status among ``outcomes`` (``pass`` when empty)."""
    present = {o.status for o in outcomes}
    return next((s for s in _SEVERITY if s in present), PASS)


def exit_code(outcomes: list[Outcome]) -> int:
    """The ``goldens check`` exit code for these outcomes."""
    return EXIT_CODES[worst_status(outcomes)]


def classify(ours_ok: bool, hf_ok: bool, ours_vs_hf_ok: bool) -> str:
    """Status from three comparisons: ours vs golden, HF now vs golden, ours vs HF now."""
    if ours_ok:
        return PASS if hf_ok else HF_DRIFT
    if not hf_ok and ours_vs_hf_ok:
        return HF_DRIFT
    return REGRESSION

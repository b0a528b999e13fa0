"""The one exit-code table of the ``gemma4-harness`` CLI and the stages (``python -m harness.stages``).

Every command returns one of these; no command gives a code another meaning. The README's "What we refuse
and why" table is written from :data:`EXIT_CODES`.
"""

from __future__ import annotations

EXIT_OK = 0
#: The check ran and failed: parity does not hold, a round trip is not bit-exact, a gate failed, a golden
#: regressed, a hardware stage's preflight found something missing.
EXIT_FAILED = 1
#: Invalid input: a file, field, tensor, flag or output path the user can fix; the message names it.
EXIT_INVALID_INPUT = 2
#: ``goldens check``: HF transformers drifted while our model still matches the goldens.
EXIT_HF_DRIFT = 3
#: ``goldens check``: a golden is missing, corrupt, unreadable or invalid.
EXIT_GOLDEN_BROKEN = 4
#: A worker rank of a multi-process run crashed, or did not finish before ``--deadline``.
EXIT_RANK_FAILED = 5
#: Stopped by SIGINT (128 + 2) or SIGTERM (128 + 15); temp files were removed.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILED: "the check ran and failed (parity, round trip, gate, golden regression, preflight)",
    EXIT_INVALID_INPUT: "invalid input (file, field, tensor, flag or output path; the message names it)",
    EXIT_HF_DRIFT: "goldens: HF drifted, our model still matches",
    EXIT_GOLDEN_BROKEN: "goldens: a golden is missing, corrupt or invalid",
    EXIT_RANK_FAILED: "a worker rank crashed or missed --deadline (the message names the rank and its log)",
    EXIT_INTERRUPTED: "interrupted (SIGINT); temp files removed",
    EXIT_TERMINATED: "terminated (SIGTERM); temp files removed",
}


def epilog() -> str:
    """The exit-code table as help text (``--help`` of every command)."""
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())

"""``gemma4-harness goldens {record,check,list}``: golden references with provenance.

Exit codes of ``goldens check``: 0 every golden matches (ours and HF); 1 regression: our model no longer
matches a golden; 2 invalid input (unknown --only case, bad flag); 3 HF drift only: HF transformers no longer
reproduces a golden while our model still does (or both moved together and still agree): review, then
re-record with ``goldens record --update``; 4 a golden is missing, corrupt (sha256), unreadable or of an unknown
schema version (the message names the file), or reference data a case needs is unavailable (the released chat
templates under shared/; leave those cases out with --only chat excluded, e.g. --only forward). When cases end
differently: 4 beats 1 beats 3.
``goldens record`` exits 0, or 2 when it refuses (existing goldens without --update, a broken manifest).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

REPO_GOLDENS = Path(__file__).resolve().parents[2] / "goldens"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``goldens`` with its ``record``, ``check`` and ``list`` actions."""
    epilog = __doc__.split("\n\n", 1)[1]
    p = sub.add_parser(
        "goldens",
        help="record or check golden references (HF outputs frozen with provenance)",
        description=__doc__.splitlines()[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from harness.cli_paths import IN_DIR, OUT_DIR, OUT_FILE, declare
    from harness.commands._options import add_budget

    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--goldens-dir", type=Path, default=REPO_GOLDENS, help=f"goldens directory (default {REPO_GOLDENS})"
    )
    common.add_argument(
        "--only",
        action="append",
        metavar="CASE",
        help=(
            "a case (forward/tiny-31b/float64, chat/standard/single_turn), family (forward, rope, weights, "
            "router, chat), prefix or pattern; repeatable"
        ),
    )
    common.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar"
    )
    rec = actions.add_parser(
        "record",
        parents=[common],
        help="compute goldens with HF and write them (explicit step)",
        epilog=epilog,
    )
    rec.add_argument("--update", action="store_true", help="overwrite existing goldens (prints what changed)")
    add_budget(rec, deadline=False)
    rec.set_defaults(func=run_record, io_paths=declare(goldens_dir=OUT_DIR))
    chk = actions.add_parser(
        "check",
        parents=[common],
        help="recompute with our model and HF and compare with the goldens",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chk.add_argument("--json", type=Path, help="also write the outcomes as JSON")
    add_budget(chk, deadline=False)
    chk.set_defaults(func=run_check, io_paths=declare(goldens_dir=IN_DIR, json=OUT_FILE))
    lst = actions.add_parser("list", help="list the golden cases and families")
    lst.set_defaults(func=run_list)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["gemma4-harness", "goldens", "record"]
    for token in args.only or []:
        parts += ["--only", token]
    if args.update:
        parts.append("--update")
    if args.goldens_dir != REPO_GOLDENS:
        parts += ["--goldens-dir", str(args.goldens_dir)]
    return shlex.join(parts)


def run_record(args: argparse.Namespace) -> int:
    """Record; 0 on success (refusals raise InvalidInputError -> 2)."""
    import torch

    from harness.goldens.record import record_goldens

    torch.set_num_threads(1)  # tiny models: threads add only contention and core-count-dependent sums
    for line in record_goldens(args.goldens_dir, args.only, args.update, _command_line(args), args.progress):
        print(line)
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Check; exit code per the module docstring."""
    import torch

    from gemma4.atomic_io import atomic_write_json
    from harness.goldens.check import check_goldens, format_check

    torch.set_num_threads(1)  # tiny models: threads add only contention and core-count-dependent sums
    report = check_goldens(args.goldens_dir, args.only, args.progress, force=args.force)
    print(format_check(report))
    if args.json:
        atomic_write_json(args.json, report.to_json(), sort_keys=False)
    return report.exit_code


def run_list(args: argparse.Namespace) -> int:
    """Print every case and the pending families."""
    from harness.goldens.registry import FAMILY_MODULES, PENDING, family

    for name in FAMILY_MODULES:
        mod = family(name)
        print(f"{name}: {mod.DESCRIPTION}")
        for case in mod.cases():
            print(f"  {case.name}")
    for name, why in PENDING.items():
        print(f"{name}: {why}")
    return 0

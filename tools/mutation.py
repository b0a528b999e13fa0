"""Mutation testing of gemma4/ and the harness's judging parts with mutmut 3.8.1 (``tox -e mutation``).

mutmut is configured in ``pyproject.toml`` (``[tool.mutmut]``): what it mutates, which tests it may run.
This script adds what mutmut lacks: a **seeded sample** (``--max N --seed S``) so one run is affordable on
two cores, a name filter (``--only 'gemma4.model.*'``), and a per-package score table (Markdown on stdout,
JSON in ``mutants/mutation-results.json``) for ``docs/mutation.md``.

What mutmut itself provides, and why it was picked over cosmic-ray (docs/mutation.md says more):

* every mutant runs in a process **forked from one warm interpreter** (torch, Megatron-Core and
  transformers imported once; cosmic-ray starts a fresh interpreter and re-imports them per mutant);
* each mutant runs **only the tests that called the mutated function** in the unmutated run (its stats);
* the test run **stops at the first failure** (``pytest -x``).

Usage (from the repository root; ``tox -e mutation -- ARGS`` runs the same)::

    python tools/mutation.py --max 60 --seed 0      # sampled run
    python tools/mutation.py                        # every mutant (hours on 2 cores)
    python tools/mutation.py --list                 # count the mutants per package, run nothing

Exit status: 0 when every selected mutant was killed, 1 when any survived (or had no covering test), 2 for
invalid arguments.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("mutants") / "mutation-results.json"


def package_of(path: str) -> str:
    """The report's package of a mutated file: ``gemma4/model``, ``gemma4 (top level)``, ``harness (judging)``."""
    parts = Path(path).parts
    if parts[0] == "gemma4":
        return "gemma4/" + parts[1] if len(parts) > 2 else "gemma4 (top level)"
    return "harness (judging)"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=None, help="run a seeded sample of N mutants")
    parser.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    parser.add_argument("--only", action="append", default=[], help="mutant-name glob, e.g. 'gemma4.model.*'")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--list", action="store_true", help="generate the mutants, count them, run nothing")
    args = parser.parse_args(argv)
    if args.max is not None and args.max < 1:
        parser.error("--max must be at least 1")
    if args.max_children < 1:
        parser.error("--max-children must be at least 1")
    return args


def _relay_child_hits(hits: Path) -> None:
    """Count functions run only in **forked ranks** as covered by the test that forked them.

    mutmut records which test called which function (its "stats") in the process running pytest. Our
    parallel tests fork gloo ranks (``harness/distributed.py``); a function only those ranks call (the TP
    split, CP zig-zag, expert placement) would look untested and every mutant in it would be reported as
    "no tests" without being run. Here a forked process appends its hits to ``hits``, and the parent adds
    them to the running test's stats before mutmut's own teardown hook files them under that test.
    Interpreters started with ``subprocess`` (CLI tests) are not relayed: their functions are covered
    through in-process tests or reported as "no tests".
    """
    import mutmut.mutation.trampoline as trampoline
    import mutmut.runners.harness as runners
    import pytest
    from mutmut.state import state

    record = trampoline.record_trampoline_hit
    pytest_pid = [0]  # the process running pytest (mutmut's stats child under its fork server)
    seen: set[str] = set()

    def record_or_relay(name: str, caller: str | None = None) -> None:
        if os.getpid() == pytest_pid[0]:
            record(name, caller)
        elif name not in seen:  # one line per function per forked rank
            seen.add(name)
            with open(hits, "a") as f:
                f.write(name + "\n")

    class Relay:
        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_teardown(self, item: object, nextitem: object) -> None:
            if hits.exists():
                state()._stats.update(hits.read_text().split())
                hits.unlink()

    execute = runners.PytestRunner.execute_pytest

    def execute_with_relay(self: object, params: list[str], **kwargs: object) -> int:
        pytest_pid[0] = os.getpid()
        seen.clear()
        kwargs["plugins"] = [*kwargs.get("plugins", []), Relay()]  # type: ignore[list-item]
        return execute(self, params, **kwargs)

    trampoline.record_trampoline_hit = record_or_relay
    runners.PytestRunner.execute_pytest = execute_with_relay  # type: ignore[method-assign]


def _generate(max_children: int) -> dict[str, str]:
    """Generate mutmut's mutants (cached across runs) and return ``{mutant name: source path}``."""
    import mutmut.__main__ as mm
    from mutmut.mutation.data import SourceFileMutationData

    os.makedirs("mutants", exist_ok=True)
    mm.copy_src_dir()
    mm.copy_also_copy_files()
    mm.setup_source_paths()
    mm.create_mutants(max_children)
    names: dict[str, str] = {}
    for path in mm.walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        names.update(dict.fromkeys(data.exit_code_by_key, str(path)))
    return names


def _statuses(names: dict[str, str]) -> dict[str, str]:
    """mutmut's verdict per mutant (``killed``, ``survived``, ``no tests``, ``timeout``, …)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    out: dict[str, str] = {}
    for path in sorted(set(names.values())):
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            if name in names:
                out[name] = status_by_exit_code[code]
    return out


def _table(names: dict[str, str], statuses: dict[str, str]) -> tuple[str, dict[str, dict[str, int]]]:
    """Markdown score table per package. Score = killed (incl. timeouts) / mutants run; a mutant no test
    reached counts against the score (that path is never exercised)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for name, status in statuses.items():
        counts[package_of(names[name])][status] += 1
        counts["all"][status] += 1
    lines = [
        "| package | mutants | killed | survived | no tests | other | score |",
        "|---|---|---|---|---|---|---|",
    ]
    table: dict[str, dict[str, int]] = {}
    for package in sorted(counts, key=lambda p: (p == "all", p)):
        c = counts[package]
        killed = c["killed"] + c["timeout"]
        total = sum(c.values()) - c["skipped"] - c["not checked"]
        other = total - killed - c["survived"] - c["no tests"]
        score = 100.0 * killed / total if total else float("nan")
        lines.append(
            f"| {package} | {total} | {killed} | {c['survived']} | {c['no tests']} | {other} | {score:.1f} % |"
        )
        table[package] = dict(c)
    return "\n".join(lines), table


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    os.chdir(REPO)
    # The tests run from mutants/ (a copy of the repository), so "../shared beside the repository" must be
    # spelled out for them (harness/reference_data.py).
    if "GEMMA4_SHARED_DIR" not in os.environ and (REPO.parent / "shared").is_dir():
        os.environ["GEMMA4_SHARED_DIR"] = str(REPO.parent / "shared")
    start = time.monotonic()
    names = _generate(args.max_children)
    if args.only:
        names = {n: p for n, p in names.items() if any(fnmatch.fnmatch(n, g) for g in args.only)}
        if not names:
            print(f"error: --only {args.only} matches no mutant", file=sys.stderr)
            return 2
    if args.list:
        for package, count in sorted(Counter(package_of(p) for p in names.values()).items()):
            print(f"{package}: {count} mutants")
        print(f"all: {len(names)} mutants")
        return 0
    selected = sorted(names)
    if args.max is not None and args.max < len(selected):
        selected = sorted(random.Random(args.seed).sample(selected, args.max))
    print(f"mutation: {len(selected)} of {len(names)} mutants (seed {args.seed})", flush=True)

    import mutmut.__main__ as mm

    _relay_child_hits((REPO / "mutants" / "forked-rank-hits.txt").resolve())
    try:
        mm._run(selected, args.max_children)
    except SystemExit as stop:  # mutmut exits on a failing clean run
        if stop.code:
            print(f"error: mutmut stopped with status {stop.code} (see its output above)", file=sys.stderr)
            return 1
    wall = time.monotonic() - start
    chosen = {n: names[n] for n in selected}
    statuses = _statuses(chosen)
    table, counts = _table(chosen, statuses)
    survivors = sorted(n for n, s in statuses.items() if s not in ("killed", "timeout"))
    print(table)
    print(f"\nwall time: {wall:.0f} s for {len(selected)} mutants")
    for name in survivors:
        print(f"  {statuses[name]}: {name}")
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {
                "seed": args.seed,
                "max": args.max,
                "only": args.only,
                "mutants_total": len(names),
                "mutants_run": len(selected),
                "wall_s": round(wall, 1),
                "counts": counts,
                "status": statuses,
            },
            indent=1,
            sort_keys=True,
        )
    )
    os.replace(tmp, RESULTS)
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())

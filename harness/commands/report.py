"""``gemma4-harness report``: parity per preset x dtype x parallel layout, and the goldens, as one HTML page.

Writes into --out: report.html (self-contained: tables, plots inline), summary.md (Markdown summary, links
plots/*.png), plots/*.png and results.json; --junit FILE adds JUnit XML (one test case per row and golden).
Exit 0 when every applicable parity row, layout comparison and golden passes; 1 when anything fails
(summary.md lists it); 2 invalid input. With --impl, rows the implementation declares it cannot run (its
supports() / supports_run(), e.g. a layout or a config feature it does not have) are shown as "n/a" with its
reason and counted as not applicable: they decide nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands.goldens import REPO_GOLDENS
from harness.commands.result import Result


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``report`` subcommand."""
    from harness.cli_paths import IN_DIR, OUT_DIR, OUT_FILE, declare
    from harness.commands._options import add_budget, add_seed, bounded_int, preset_help
    from harness.impls import impl_help
    from harness.report.layouts import LAYOUTS

    p = sub.add_parser(
        "report",
        help="HTML + Markdown parity report (preset x dtype x layout, goldens, plots)",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--junit", type=Path, help="also write JUnit XML here")
    p.add_argument(
        "--preset", action="append", help=preset_help("preset to run (repeatable; default: every one)")
    )
    p.add_argument(
        "--dtype",
        action="append",
        choices=["float64", "float32", "bfloat16"],
        help="dtype to run (repeatable; default: float64, float32, bfloat16)",
    )
    p.add_argument(
        "--layout",
        action="append",
        help="parallel layout (repeatable; default: every registered one): "
        + ", ".join(layout["name"] for layout in LAYOUTS),
    )
    p.add_argument("--impl", metavar="NAME|module:attr", default=None, help=impl_help())
    p.add_argument("--batch", type=bounded_int("--batch", 1), default=None)
    p.add_argument("--seq-len", type=bounded_int("--seq-len", 2), default=None)
    add_seed(p)
    p.add_argument(
        "--goldens-dir", type=Path, default=REPO_GOLDENS, help=f"goldens to check (default {REPO_GOLDENS})"
    )
    p.add_argument("--goldens-only", action="append", metavar="CASE", help="check only these golden cases")
    p.add_argument("--no-goldens", action="store_true", help="do not check the goldens")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    add_budget(p)
    p.set_defaults(func=run, io_paths=declare(out=OUT_DIR, junit=OUT_FILE, goldens_dir=IN_DIR))


def run(args: argparse.Namespace) -> Result:
    """Collect, render, write; exit 0 when everything passed, else 1."""
    import torch

    from gemma4.errors import InvalidInputError
    from harness.presets import DEFAULT_BATCH, DEFAULT_SEQ_LEN, PRESETS
    from harness.report.build import write_report
    from harness.report.collect import collect
    from harness.report.layouts import select_layouts

    presets = list(dict.fromkeys(args.preset or PRESETS))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise InvalidInputError(f"--preset {unknown[0]!r} is unknown; presets: {', '.join(PRESETS)}")
    layouts = select_layouts(args.layout)
    from harness.impls import resolve_impl

    impl = resolve_impl(args.impl)
    batch = DEFAULT_BATCH if args.batch is None else args.batch
    seq_len = DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len
    if batch < 1 or seq_len < 2:
        raise InvalidInputError(f"--batch must be >= 1 and --seq-len >= 2 (got {batch}, {seq_len})")
    try:  # fail before the runs, not after them
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInputError("the report's plots need matplotlib: pip install -e '.[test]'") from None
    from gemma4.config import text_spec_from_any
    from harness.budget import check_budget, estimate_run
    from harness.presets import preset_config_dict

    for preset in presets:  # before any run: the largest row of each preset (fp64, the widest layout)
        spec = text_spec_from_any(preset_config_dict(preset))
        impl.supports(spec)  # reference data an implementation needs and lacks: exit 2 before any run
        world = max(getattr(lay["kwargs"].get("layout"), "world_size", 1) for lay in layouts)
        forced = check_budget(
            estimate_run(spec, torch.float64, batch, seq_len, grads=False, world_size=world),
            force=args.force,
            what=f"report {preset} batch {batch} x seq {seq_len}",
        )
        if forced:
            print(f"note: {forced}")
    torch.set_num_threads(1)  # tiny models: threads only add contention and machine-dependent reductions
    data = collect(
        presets,
        list(dict.fromkeys(args.dtype or ["float64", "float32", "bfloat16"])),
        layouts,
        batch=batch,
        seq_len=seq_len,
        seed=args.seed,
        goldens_dir=None if args.no_goldens else args.goldens_dir,
        goldens_only=args.goldens_only,
        show_progress=args.progress,
        timeout=args.deadline,
        impl=impl,
    )
    written = write_report(data, args.out, args.junit)
    lines = [f"report: {written['html']}  summary: {written['markdown']}"]
    n_na = len(data.not_applicable)
    lines.append(
        f"implementation under test: {data.impl}; {len(data.rows) - n_na} parity row(s) applicable, "
        f"{n_na} not applicable"
    )
    lines += [f"  n/a {r.preset} {r.dtype} {r.layout}: {r.not_applicable}" for r in data.not_applicable]
    if args.junit:
        lines.append(f"junit: {written['junit']}")
    if data.passed:
        lines.append("PASS")
    else:
        lines.append(f"FAIL ({len(data.failures)} failing item(s)):")
        lines += [f"  - {line}" for line in data.failures]
    written_paths = {k: str(v) for k, v in written.items()}
    return Result.verdict(
        {
            "written": written_paths,
            "failures": data.failures,
            "impl": data.impl,
            "not_applicable": [
                {"preset": r.preset, "dtype": r.dtype, "layout": r.layout, "reason": r.not_applicable}
                for r in data.not_applicable
            ],
        },
        "\n".join(lines),
        data.passed,
    )

"""``gemma4-harness e2e-gsm8k`` / ``tox -e e2e-gsm8k``: preflight, run, parse, gate, report.

Exit codes: 0 the run passed every gate (or ``--dry-run`` printed the plan); 1 preflight found missing
pieces, the run failed or a gate failed; 2 invalid arguments. Every path flag also reads a ``GEMMA4_*``
environment variable (below), so ``tox -e e2e-gsm8k`` needs no positional arguments on a prepared node.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

VARIANT_NAMES = ("31b", "26b-a4b", "12b", "tiny")
ENV = {
    "variant": "GEMMA4_E2E_VARIANT",
    "checkpoint": "GEMMA4_E2E_CHECKPOINT",
    "dataset": "GEMMA4_GSM8K_DATA",
    "eval_dataset": "GEMMA4_GSM8K_EVAL_DATA",
    "slime_dir": "GEMMA4_SLIME_DIR",
    "megatron_dir": "GEMMA4_MEGATRON_LM_DIR",
    "workdir": "GEMMA4_E2E_WORKDIR",
    "mcore_checkpoint": "GEMMA4_E2E_MCORE_CHECKPOINT",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The e2e flags (shared by the CLI subcommand and ``python -m harness.stages e2e-gsm8k``)."""

    def env(name: str) -> str:
        return f" (env {ENV[name]})"

    p.add_argument(
        "--variant",
        choices=VARIANT_NAMES,
        default=os.environ.get(ENV["variant"]),
        help="model size" + env("variant"),
    )
    p.add_argument(
        "--hf-checkpoint",
        dest="checkpoint",
        type=Path,
        default=os.environ.get(ENV["checkpoint"]),
        help="HF checkpoint dir (with tokenizer)" + env("checkpoint"),
    )
    # the flag's old spelling, kept as a hidden alias (one flag name per concept across commands)
    p.add_argument(
        "--checkpoint",
        dest="checkpoint",
        type=Path,
        default=os.environ.get(ENV["checkpoint"]),
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=os.environ.get(ENV["dataset"]),
        help="GSM8K train prompts, .jsonl or .parquet" + env("dataset"),
    )
    p.add_argument(
        "--eval-dataset",
        type=Path,
        default=os.environ.get(ENV["eval_dataset"]),
        help="optional GSM8K test prompts" + env("eval_dataset"),
    )
    p.add_argument(
        "--slime-dir",
        type=Path,
        default=os.environ.get(ENV["slime_dir"]),
        help="slime checkout (train.py)" + env("slime_dir"),
    )
    p.add_argument(
        "--megatron-dir",
        type=Path,
        default=os.environ.get(ENV["megatron_dir"]),
        help="Megatron-LM checkout for PYTHONPATH" + env("megatron_dir"),
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=os.environ.get(ENV["workdir"]),
        help="logs, converted checkpoint, report" + env("workdir"),
    )
    p.add_argument(
        "--mcore-checkpoint",
        type=Path,
        default=os.environ.get(ENV["mcore_checkpoint"]),
        help="existing Megatron load dir (skips the conversion)" + env("mcore_checkpoint"),
    )
    p.add_argument("--num-rollout", type=int, default=3)
    p.add_argument("--rollout-batch-size", type=int, default=8)
    p.add_argument("--n-samples-per-prompt", type=int, default=4)
    p.add_argument("--input-key", default="messages")
    p.add_argument("--label-key", default="label")
    p.add_argument(
        "--deadline", dest="timeout", type=int, help="seconds for the whole run (default: per variant)"
    )
    p.add_argument("--timeout", dest="timeout", type=int, help=argparse.SUPPRESS)  # old spelling
    p.add_argument(
        "--stall-timeout", type=int, default=900, help="kill the run after this long without output"
    )
    p.add_argument("--gates", type=Path, help="gate bounds golden (default goldens/gsm8k/gates.json)")
    p.add_argument("--json", type=Path, help="report path (default <workdir>/report.json)")
    p.add_argument("--strict-localhost", action="store_true", help="fail when a process listens off loopback")
    p.add_argument(
        "--dry-run", action="store_true", help="print the full command and configuration; run nothing"
    )
    p.add_argument("--parse-log", type=Path, help="gate an existing train log instead of running")
    p.add_argument("--exit-code", type=int, help="with --parse-log: the exit code the logged run had")
    from harness.cli_paths import IN_DIR, IN_FILE, OUT_DIR, OUT_FILE, declare

    p.set_defaults(
        io_paths=declare(
            checkpoint=IN_DIR,
            dataset=IN_FILE,
            eval_dataset=IN_FILE,
            slime_dir=IN_DIR,
            megatron_dir=IN_DIR,
            mcore_checkpoint=IN_DIR,
            gates=IN_FILE,
            parse_log=IN_FILE,
            workdir=OUT_DIR,
            json=OUT_FILE,
        )
    )


def options_from_args(args: argparse.Namespace):
    """Validated :class:`harness.gsm8k.command.Options` (bad values raise ``InvalidInputError``)."""
    from gemma4.errors import InvalidInputError
    from harness.gsm8k.command import Options
    from harness.gsm8k.variants import RunSettings

    if args.variant is None:
        raise InvalidInputError(f"--variant is required ({', '.join(VARIANT_NAMES)}; or {ENV['variant']})")
    for flag in ("num_rollout", "rollout_batch_size", "n_samples_per_prompt", "stall_timeout"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.timeout is not None and args.timeout < 1:
        raise InvalidInputError(f"--deadline must be >= 1, got {args.timeout}")
    settings = RunSettings(
        num_rollout=args.num_rollout,
        rollout_batch_size=args.rollout_batch_size,
        n_samples_per_prompt=args.n_samples_per_prompt,
        input_key=args.input_key,
        label_key=args.label_key,
    )
    return Options(
        variant=args.variant,
        checkpoint=args.checkpoint,
        dataset=args.dataset,
        eval_dataset=args.eval_dataset,
        slime_dir=args.slime_dir,
        megatron_dir=args.megatron_dir,
        workdir=args.workdir,
        mcore_checkpoint=args.mcore_checkpoint,
        settings=settings,
        timeout_s=args.timeout,
        stall_timeout_s=args.stall_timeout,
    )


def _gates_text(gates_path: Path | None) -> str:
    from harness.gsm8k.golden import GATES_FILE, GoldenError, load_bounds

    try:
        b = load_bounds(gates_path or GATES_FILE)
    except GoldenError as exc:
        return f"UNUSABLE: {exc}"
    return (
        f"exit 0; >= num_rollout steps and rollouts; all metrics finite; |train/ppo_kl| at step 0 < "
        f"{b.ppo_kl_step0_max_abs:g}; train/train_rollout_logprob_abs_diff <= {b.logprob_abs_diff_max:g}; "
        f"rollout/raw_reward >= floor per variant {b.raw_reward_min} ({b.source})"
    )


def gate_log(
    variant: str,
    log: Path,
    exit_code: int | None,
    num_rollout: int,
    gates_path: Path | None,
    json_path: Path | None,
) -> int:
    """``--parse-log``: gate an existing log as if the run had ended with ``exit_code``."""
    from gemma4.errors import InvalidInputError
    from harness.gsm8k.gates import RunOutcome, evaluate, passed
    from harness.gsm8k.golden import GATES_FILE, GoldenError, load_bounds
    from harness.gsm8k.metrics import parse_lines
    from harness.gsm8k.report import build_report, render_summary, write_report

    try:
        bounds = load_bounds(gates_path or GATES_FILE)
    except GoldenError as exc:
        print(f"e2e-gsm8k: FAILED: {exc}", file=sys.stderr)
        return 1
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            metrics = parse_lines(f)
    except OSError as exc:
        raise InvalidInputError(f"--parse-log {log}: cannot read ({exc})") from exc
    outcome = RunOutcome(
        exit_code, "exited" if exit_code is not None else "not-started", 0.0, "from --parse-log"
    )
    gates = evaluate(metrics, outcome, bounds, variant, num_rollout)
    report = build_report(variant, gates, outcome, metrics, bounds, [], [str(log)])
    if json_path is not None:
        write_report(report, json_path)
    print(render_summary(report))
    return 0 if passed(gates) else 1


def run(args: argparse.Namespace) -> int:
    """Dry run, log gating, or the real run (preflight first)."""
    from harness.gsm8k.command import build_plan, render_plan

    options = options_from_args(args)
    if args.parse_log is not None:
        return gate_log(
            options.variant,
            args.parse_log,
            args.exit_code,
            options.settings.num_rollout,
            args.gates,
            args.json,
        )
    plan = build_plan(options)
    if args.dry_run:
        print(render_plan(plan, _gates_text(args.gates)))
        return 0
    return run_plan(plan, args)


def run_plan(plan, args: argparse.Namespace) -> int:
    """Preflight, then every step in order; gates and report from the train log."""
    import time

    from harness.gsm8k.gates import RunOutcome, evaluate, passed
    from harness.gsm8k.golden import GATES_FILE, load_bounds
    from harness.gsm8k.launcher import run_step
    from harness.gsm8k.metrics import parse_lines
    from harness.gsm8k.preflight import preflight
    from harness.gsm8k.report import build_report, render_summary, write_report

    problems = preflight(plan, args.gates)
    if problems:
        print(
            f"e2e-gsm8k {plan.variant.name}: preflight FAILED, nothing was started. Missing or wrong:",
            file=sys.stderr,
        )
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    bounds = load_bounds(args.gates or GATES_FILE)
    start = time.monotonic()
    outcome = RunOutcome(None, "not-started")
    logs: list[str] = []
    for step in plan.steps:
        remaining = plan.timeout_s - (time.monotonic() - start)
        log = plan.workdir / f"{step.name}.log"
        print(f"e2e-gsm8k: step {step.name} (log {log})", flush=True)
        result = run_step(
            step, log, remaining, plan.options.stall_timeout_s, watch_localhost=step.name == "train"
        )
        logs.append(str(log))
        outcome = result.outcome
        if outcome.reason != "exited" or outcome.exit_code != 0:
            outcome.detail = f"step {step.name}: {outcome.detail}".rstrip(": ")
            break
    train_log = plan.workdir / "train.log"
    lines = train_log.read_text(encoding="utf-8", errors="replace").splitlines() if train_log.exists() else []
    metrics = parse_lines(lines)
    outcome.duration_s = time.monotonic() - start
    gates = evaluate(
        metrics, outcome, bounds, plan.variant.name, plan.settings.num_rollout, args.strict_localhost
    )
    report = build_report(
        plan.variant.name, gates, outcome, metrics, bounds, [s.shell() for s in plan.steps], logs
    )
    write_report(report, args.json or plan.workdir / "report.json", plan.workdir / "summary.md")
    print(render_summary(report))
    return 0 if passed(gates) else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m harness.stages e2e-gsm8k ...``); invalid input exits 2."""
    from gemma4.errors import InvalidInputError

    parser = argparse.ArgumentParser(prog="e2e-gsm8k", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InvalidInputError as exc:
        print(f"e2e-gsm8k: error: {exc}", file=sys.stderr)
        return 2

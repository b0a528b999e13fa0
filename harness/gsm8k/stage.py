"""The e2e GSM8K stage behind ``gemma4-harness e2e-gsm8k`` (flags: :mod:`harness.commands.e2e_gsm8k`):
validated options, dry run, gating an existing log, or preflight + run + parse + gate + report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.commands.e2e_gsm8k import ENV, VARIANT_NAMES


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


def _gates_text() -> str:
    from harness.tolerances import GSM8K_GATES as b

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
    json_path: Path | None,
) -> int:
    """``--parse-log``: gate an existing log as if the run had ended with ``exit_code``."""
    from gemma4.errors import InvalidInputError
    from harness.gsm8k.gates import RunOutcome, evaluate, passed
    from harness.gsm8k.metrics import parse_lines
    from harness.gsm8k.report import build_report, render_summary, write_report
    from harness.tolerances import GSM8K_GATES as bounds

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
            args.json,
        )
    plan = build_plan(options)
    if args.dry_run:
        print(render_plan(plan, _gates_text()))
        return 0
    return run_plan(plan, args)


def run_plan(plan, args: argparse.Namespace) -> int:
    """Preflight, then every step in order; gates and report from the train log."""
    import time

    from harness.gsm8k.gates import RunOutcome, evaluate, passed
    from harness.gsm8k.launcher import run_step
    from harness.gsm8k.metrics import parse_lines
    from harness.gsm8k.preflight import preflight
    from harness.gsm8k.report import build_report, render_summary, write_report

    problems = preflight(plan)
    if problems:
        print(
            f"e2e-gsm8k {plan.variant.name}: preflight FAILED, nothing was started. Missing or wrong:",
            file=sys.stderr,
        )
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    from harness.tolerances import GSM8K_GATES as bounds

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

"""``gemma4-harness e2e-mini``: a few GRPO steps on a tiny preset on CPU, with train/rollout agreement gates.

Exit 0 when every gate holds, 1 when one fails (each failure is named), 2 for invalid input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.commands.result import Result

#: Upper bound on a rendered arithmetic prompt's length in tokens (for the memory estimate).
PROMPT_TOKENS = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``e2e-mini`` subcommand."""
    from harness.cli_paths import OUT_FILE, declare
    from harness.commands._options import (
        add_budget,
        add_seed,
        bounded_int,
        positive_float,
        preset_help,
        preset_name,
    )
    from harness.exit_codes import epilog

    p = sub.add_parser(
        "e2e-mini",
        help="CPU RL smoke: train (Megatron), sync through the converter, roll out (HF), compare log-probs",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="tiny-31b", type=preset_name, help=preset_help("tiny preset"))
    p.add_argument(
        "--steps",
        type=bounded_int("--steps", 1, 10_000),
        default=2,
        help="optimizer steps (each followed by a sync and a rollout)",
    )
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument(
        "--tp", type=int, default=1, help="tensor parallel size of the trainer (forked gloo ranks)"
    )
    p.add_argument("--ep", type=int, default=1, help="expert parallel size of the trainer (MoE presets)")
    p.add_argument(
        "--prompts", type=bounded_int("--prompts", 1), default=2, help="arithmetic problems per rollout"
    )
    p.add_argument(
        "--group-size",
        type=bounded_int("--group-size", 2),
        default=8,
        help="sampled responses per problem (GRPO group)",
    )
    p.add_argument("--max-new-tokens", type=bounded_int("--max-new-tokens", 1), default=16)
    add_seed(p)
    p.add_argument("--lr", type=positive_float("--lr"), default=1e-4, help="Adam learning rate")
    p.add_argument(
        "--bucket-kib",
        type=positive_float("--bucket-kib"),
        default=256.0,
        help="weight-sync bucket size in KiB",
    )
    p.add_argument("--json", type=Path, help="write the result as JSON")
    add_budget(p)
    p.set_defaults(func=run, io_paths=declare(json=OUT_FILE))


def format_summary(result: dict[str, Any]) -> str:
    """A short table, one row per iteration, and the verdict."""
    lay = result["layout"]
    tol = result["tolerance"]
    lines = [
        f"e2e-mini {result['preset']}  dtype={result['dtype']}  tp={lay['tp']} ep={lay['ep']}"
        f"{' +sp' if lay['sequence_parallel'] else ''}  steps={result['num_steps']}  ({lay['rollout_engine']})",
        "  iter  sync: buckets tensors   gap max    KL(ref)    reward   adv!=0   loss       |dw| max   "
        "d logp max",
    ]
    for s in result["steps"]:
        sync = s.get("sync") or {}
        loss = f"{s['loss']:+.3e}" if "loss" in s else "-"
        dw = f"{s['weights_max_change']:.2e}" if "weights_max_change" in s else "-"
        shift = f"{s['policy_shift_max']:.2e}" if "policy_shift_max" in s else "-"
        lines.append(
            f"  {s['iteration']:>4}  {sync.get('buckets', '-'):>13} {sync.get('hf_tensors', '-'):>7}   "
            f"{s['logprob_gap_max']:.2e}   {s['kl_ref_max']:.2e}   {s['reward_mean']:.4f}   "
            f"{s['nonzero_advantages']:>6}   {loss:<10} {dw:<10} {shift}"
        )
    lines.append(
        f"  max log-prob gap {result['max_logprob_gap']:.3e} (<= {tol['logprob_gap']:.0e})   "
        f"step-0 KL {result['step0_kl']:.3e} (<= {tol['step0_kl']:.0e})"
    )
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if result["pass"]:
        lines.append("PASS")
    else:
        lines.append("FAIL")
        lines += [f"  - {f}" for f in result["failures"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Result:
    """Run the smoke; exit code 0/1 (2 is raised as InvalidInputError)."""
    from harness.e2e.run import E2EConfig, run_e2e

    cfg = E2EConfig(
        preset=args.preset,
        dtype=args.dtype,
        steps=args.steps,
        tp=args.tp,
        ep=args.ep,
        prompts=args.prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        lr=args.lr,
        bucket_bytes=int(args.bucket_kib * 1024),
    )
    import dataclasses

    from gemma4.config import text_spec_from_any
    from harness.budget import check_budget, estimate_run
    from harness.presets import preset_config_dict

    if args.deadline is not None:
        cfg = dataclasses.replace(cfg, timeout=args.deadline)
    # Rollouts of every prompt's group (+ a greedy one) of at most PROMPT_TOKENS + max_new_tokens tokens,
    # trained with gradients: estimated before anything is built.
    forced = check_budget(
        estimate_run(
            text_spec_from_any(preset_config_dict(args.preset)),
            args.dtype,
            cfg.rows,
            PROMPT_TOKENS + args.max_new_tokens,
            grads=True,
            world_size=args.tp * args.ep,
        ),
        force=args.force,
        what=f"e2e-mini {args.preset} ({cfg.rows} rollouts x {args.max_new_tokens} new tokens)",
    )
    result = run_e2e(cfg)
    if forced:
        result["notes"].append(forced)
    return Result.verdict(result, format_summary(result), result["pass"])

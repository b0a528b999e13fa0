"""``gemma4-harness e2e-gsm8k`` / ``tox -e e2e-gsm8k``: a short GSM8K RL run through slime with the Gemma 4
plugin: preflight, run, parse, gate, report (:mod:`harness.gsm8k.stage`).

Exit codes: 0 the run passed every gate (or ``--dry-run`` printed the plan); 1 preflight found missing
pieces, the run failed or a gate failed; 2 invalid arguments. Every path flag also reads a ``GEMMA4_*``
environment variable (below), so ``tox -e e2e-gsm8k`` needs no positional arguments on a prepared node.
``python -m harness.stages e2e-gsm8k ARGS`` runs this same command (one parser).
"""

from __future__ import annotations

import argparse
import os
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
    # path flags: (flag, dest, help); each also reads its GEMMA4_* variable (ENV)
    for flag, dest, text in (
        ("--hf-checkpoint", "checkpoint", "HF checkpoint dir (with tokenizer)"),
        ("--checkpoint", "checkpoint", None),  # the old spelling, a hidden alias (one flag name per concept)
        ("--dataset", "dataset", "GSM8K train prompts, .jsonl or .parquet"),
        ("--eval-dataset", "eval_dataset", "optional GSM8K test prompts"),
        ("--slime-dir", "slime_dir", "slime checkout (train.py)"),
        ("--megatron-dir", "megatron_dir", "Megatron-LM checkout for PYTHONPATH"),
        ("--workdir", "workdir", "logs, converted checkpoint, report"),
        ("--mcore-checkpoint", "mcore_checkpoint", "existing Megatron load dir (skips the conversion)"),
    ):
        p.add_argument(
            flag,
            dest=dest,
            type=Path,
            default=os.environ.get(ENV[dest]),
            help=argparse.SUPPRESS if text is None else text + env(dest),
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
            parse_log=IN_FILE,
            workdir=OUT_DIR,
            json=OUT_FILE,
        )
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``e2e-gsm8k`` subcommand."""
    from harness.exit_codes import epilog

    p = sub.add_parser(
        "e2e-gsm8k",
        help="end-to-end GSM8K RL smoke through slime (needs GPUs)",
        description=__doc__.split("\n\n")[0],
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dry run, log gating or the real run; 0 pass, 1 fail (2 is raised as InvalidInputError)."""
    from harness.gsm8k.stage import run as run_stage

    return run_stage(args)

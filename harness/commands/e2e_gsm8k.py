"""``gemma4-harness e2e-gsm8k``: a short GSM8K RL run through slime with the Gemma 4 plugin, gated.

See :mod:`harness.gsm8k.cli` (flags, exit codes) and README "Running with slime".
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``e2e-gsm8k`` subcommand."""
    from harness.gsm8k.cli import add_arguments

    p = sub.add_parser("e2e-gsm8k", help="end-to-end GSM8K RL smoke through slime (needs GPUs)")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dry run, log gating or the real run; 0 pass, 1 fail (2 is raised as InvalidInputError)."""
    from harness.gsm8k.cli import run as run_e2e

    return run_e2e(args)

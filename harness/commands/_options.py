"""Flags several commands share, each defined once: one name per concept, one validation, one help text.

Help texts come from the tables the code uses (:data:`harness.presets.PRESETS`, the report's layouts), so
they cannot fall behind. Old spellings stay accepted as hidden aliases.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.presets import PRESETS

#: Largest seed accepted: torch seeds generators with ``seed + k`` for small ``k`` and needs an int64.
MAX_SEED = 2**62


def bounded_int(name: str, low: int, high: int | None = None):
    """An argparse ``type`` accepting integers in ``[low, high]``; the error names the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            upper = f" and <= {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}{upper}, got {value}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def positive_float(name: str):
    """An argparse ``type`` accepting finite floats > 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a number, got {text!r}") from None
        if not (value > 0 and value != float("inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text}")
        return value

    parse.__name__ = name
    return parse


def preset_name(text: str) -> str:
    """An argparse ``type`` for ``--preset``: a name from :data:`harness.presets.PRESETS`."""
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; presets: {', '.join(PRESETS)}")
    return text


def preset_help(what: str = "built-in tiny preset") -> str:
    """``"built-in tiny preset: tiny-31b, tiny-12b, ..."`` from the preset table."""
    return f"{what}: {', '.join(PRESETS)}"


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed N`` (0 <= N <= 2^62)."""
    p.add_argument("--seed", type=bounded_int("--seed", 0, MAX_SEED), default=0, help="random seed")


def add_budget(p: argparse.ArgumentParser, *, deadline: bool = True) -> None:
    """``--force`` (run although the memory estimate exceeds what is available) and ``--deadline SECONDS``
    (how long worker ranks of a multi-process run may take)."""
    p.add_argument(
        "--force",
        action="store_true",
        help="run even when the estimated memory exceeds what this machine has available",
    )
    if deadline:
        p.add_argument(
            "--deadline",
            type=positive_float("--deadline"),
            default=None,
            metavar="SECONDS",
            help="seconds the worker ranks of a multi-process run (--tp/--cp/--ep) may take before they are "
            "stopped and the run fails with exit 5 (default: $GEMMA4_RANK_DEADLINE_S or 300)",
        )


def add_hf_checkpoint(
    p: argparse.ArgumentParser, *, required: bool, help: str, old: str | None = None
) -> None:
    """``--hf-checkpoint DIR`` (the one spelling for an HF checkpoint directory); ``old`` is a hidden alias."""
    if old is None:
        p.add_argument("--hf-checkpoint", type=Path, required=required, help=help)
        return
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--hf-checkpoint", type=Path, help=help)
    group.add_argument(old, dest="hf_checkpoint", type=Path, help=argparse.SUPPRESS)

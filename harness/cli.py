"""``gemma4-harness`` command line: one subcommand per module in :data:`COMMAND_MODULES`.

Exit codes: 0 success, 1 a check failed, 2 invalid input (the message names the problem).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gemma4.errors import InvalidInputError

COMMAND_MODULES = (
    "harness.commands.parity",
    "harness.commands.goldens",
    "harness.commands.report",
    "gemma4.chat.cli",
    "harness.commands.convert",
    "harness.commands.e2e_mini",
    "harness.commands.e2e_gsm8k",
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 already; keep its message short
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = _Parser(prog="gemma4-harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidInputError as exc:
        print(f"gemma4-harness {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INVALID_INPUT


if __name__ == "__main__":
    raise SystemExit(main())

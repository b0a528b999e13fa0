"""``gemma4-harness`` command line: one subcommand per module in :data:`COMMAND_MODULES`.

Every command goes through :func:`main`, which holds the rules all of them share:

* every path the command will **write** is checked before any work (writable, not one of its inputs, not
  inside an input directory; :mod:`harness.cli_paths`), from the ``io_paths`` each subcommand declares;
* **SIGTERM** is turned into an exception like SIGINT's, so the temp files and directories of an
  interrupted command are removed on both (exit 143 / 130);
* errors become one line and an exit code from the one table, :mod:`harness.exit_codes`: invalid input
  (exit 2) and a failed or hung worker rank (exit 5) never print a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from gemma4.errors import InvalidInputError
from harness.exit_codes import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_RANK_FAILED,
    EXIT_TERMINATED,
    epilog,
)

COMMAND_MODULES = (
    "harness.commands.parity",
    "harness.commands.goldens",
    "harness.commands.report",
    "harness.commands.mask",
    "harness.commands.convert",
    "harness.commands.e2e_mini",
    "harness.commands.e2e_gsm8k",
)

__all__ = ["EXIT_FAILED", "EXIT_INVALID_INPUT", "EXIT_OK", "Terminated", "build_parser", "main"]


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally``/``except BaseException`` cleanup runs as on
    Ctrl-C (a ``BaseException``, like ``KeyboardInterrupt``: ordinary ``except Exception`` does not eat it)."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (the usage is one --help away)
        self.exit(EXIT_INVALID_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = _Parser(
        prog="gemma4-harness",
        description=__doc__.splitlines()[0],
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    from harness.cli_paths import check_paths
    from harness.commands.result import finish

    check_paths(args)
    return finish(args.func(args), getattr(args, "json", None))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return int(exc.code or 0)
    command = " ".join(
        x for x in (args.command, getattr(args, "direction", None), getattr(args, "action", None)) if x
    )
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test thread): leave signals alone
        pass
    try:
        return _run(args)
    except InvalidInputError as exc:
        print(f"gemma4-harness {command}: error: {exc}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except KeyboardInterrupt:
        print(f"gemma4-harness {command}: interrupted; temp files removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"gemma4-harness {command}: terminated (SIGTERM); temp files removed", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:
        from harness.distributed import DistributedRunError

        if isinstance(exc, DistributedRunError):
            summary = exc.summary() if hasattr(exc, "summary") else str(exc)
            print(f"gemma4-harness {command}: {summary}", file=sys.stderr)
            return EXIT_RANK_FAILED
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ += ["EXIT_INTERRUPTED", "EXIT_RANK_FAILED", "EXIT_TERMINATED"]

if __name__ == "__main__":
    raise SystemExit(main())

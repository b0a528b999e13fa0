"""Checking every path a command reads or writes before it does any work.

Each subcommand declares its paths once, with :func:`declare`::

    p.set_defaults(io_paths=declare(json=OUT_FILE, dump=OUT_DIR, hf_config=IN_FILE, hf_checkpoint=IN_DIR))

and :func:`check_paths` (called by :func:`harness.cli.main` before the command runs) refuses, with exit 2
and the flag's name:

* an output whose nearest existing ancestor is not a writable directory (it could only fail after the work);
* a file output that is an existing directory, a directory output that is an existing file;
* an output that *is* one of the command's inputs, or lies inside an input directory (``--json`` naming the
  checkpoint's own ``config.json`` would silently break the checkpoint);
* two outputs naming the same path.

Paths are compared after resolving symlinks, so a link to an input is the input.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from gemma4.errors import InvalidInputError

IN_FILE = "input file"
IN_DIR = "input directory"
OUT_FILE = "output file"
OUT_DIR = "output directory"
_KINDS = (IN_FILE, IN_DIR, OUT_FILE, OUT_DIR)


def declare(**paths: str) -> dict[str, str]:
    """``{dest: kind}`` for :func:`check_paths`; ``kind`` is one of ``IN_FILE``, ``IN_DIR``, ``OUT_FILE``,
    ``OUT_DIR`` (``dest`` is the argparse destination, e.g. ``hf_checkpoint`` for ``--hf-checkpoint``)."""
    for dest, kind in paths.items():
        if kind not in _KINDS:
            raise ValueError(f"unknown path kind {kind!r} for {dest}")
    return dict(paths)


def flag_name(dest: str) -> str:
    """``hf_checkpoint`` -> ``--hf-checkpoint``."""
    return "--" + dest.replace("_", "-")


def _values(args: argparse.Namespace, dest: str) -> list[Path]:
    value: Any = getattr(args, dest, None)
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [Path(v) for v in items if v is not None]


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _check_writable(flag: str, path: Path, kind: str) -> None:
    if path.exists():
        if kind == OUT_FILE and path.is_dir():
            raise InvalidInputError(f"{flag} {path}: is a directory; expected a file to write")
        if kind == OUT_DIR and not path.is_dir():
            raise InvalidInputError(f"{flag} {path}: exists and is not a directory")
    probe = path if (kind == OUT_DIR and path.is_dir()) else path.parent
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail later
            raise InvalidInputError(f"{flag} {path}: {probe} is a dangling symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidInputError(f"{flag} {path}: {probe} is not a directory, cannot write below it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{flag} {path}: directory {probe} is not writable")


def check_paths(args: argparse.Namespace) -> None:
    """Validate the paths ``args.io_paths`` declares (see the module docstring); raise on the first bad one."""
    declared: dict[str, str] = getattr(args, "io_paths", None) or {}
    inputs: list[tuple[str, Path, str]] = []
    outputs: list[tuple[str, Path, str]] = []
    for dest, kind in declared.items():
        for path in _values(args, dest):
            (inputs if kind in (IN_FILE, IN_DIR) else outputs).append((flag_name(dest), path, kind))
    seen: dict[Path, str] = {}
    for flag, path, kind in outputs:
        _check_writable(flag, path, kind)
        real = _real(path)
        if real in seen:
            raise InvalidInputError(f"{flag} {path}: the same path as {seen[real]}; give each output its own")
        seen[real] = flag
        for in_flag, in_path, in_kind in inputs:
            in_real = _real(in_path)
            if real == in_real:
                raise InvalidInputError(
                    f"{flag} {path}: is the command's input {in_flag} {in_path}; writing it would destroy the "
                    "input (choose another path)"
                )
            if in_kind == IN_DIR and _inside(real, in_real):
                raise InvalidInputError(
                    f"{flag} {path}: lies inside the input directory {in_flag} {in_path}; writing there could "
                    "overwrite or corrupt the input (choose a path outside it)"
                )
            if kind == OUT_DIR and in_real != real and _inside(in_real, real) and in_kind == IN_DIR:
                raise InvalidInputError(
                    f"{flag} {path}: contains the input directory {in_flag} {in_path}; choose another path"
                )

"""Reading untrusted input: regular files only, paths that stay inside their checkpoint, strict JSON.

Every reader of user-supplied files (configs, checkpoints, manifests, goldens, conversations) goes through
these helpers, so one rule holds everywhere:

* a file that is read must be a **regular file** (a FIFO, socket or device named ``model.safetensors``
  would block or never end); symlinks are followed (HF caches link snapshots to blobs), their target must be
  a regular file;
* a path named **inside** a checkpoint (a safetensors index's ``weight_map``, a ``torch_dist``
  ``relative_path``) is relative, has no ``..`` and no drive or root: it cannot leave the checkpoint;
* **JSON** is parsed strictly: ``NaN``/``Infinity`` literals are refused (they are not JSON and would reach
  the model as non-finite numbers), nesting is bounded (a very deep document is refused, not a
  ``RecursionError``), and the file size is bounded before it is read.

Every refusal is an :class:`~gemma4.errors.InvalidInputError` naming the file (exit code 2 in the CLI).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from gemma4.errors import InvalidInputError

#: Deepest nesting accepted in a JSON document. Configs nest 3 deep, goldens manifests 5, chat messages
#: with tool-call arguments a handful; 64 leaves room for any real document and stays far below Python's
#: recursion limit (the C decoder and every recursive walker after it).
MAX_JSON_DEPTH = 64

#: Largest JSON file read (bytes). The largest real ones are sharded-safetensors indexes (~100 KB for a
#: 31B model) and goldens manifests (~50 KB).
MAX_JSON_BYTES = 64 * 1024 * 1024


def require_regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` if it names a regular file (after following symlinks); else :class:`InvalidInputError`."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise InvalidInputError(f"{path}: {what} must be a regular file, found {kind}")
    return path


def path_inside(root: str | os.PathLike[str], relative: object, what: str) -> Path:
    """``root / relative`` for a name read from a file inside ``root``; refuses names that could leave it.

    ``relative`` must be a non-empty string, relative in both POSIX and Windows terms, without ``..``
    components or NUL bytes. ``what`` names where the name came from (e.g. ``"ckpt/.metadata:
    relative_path"``).
    """
    if not isinstance(relative, str) or not relative:
        raise InvalidInputError(f"{what}: expected a non-empty relative file name, got {relative!r}")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if (
        "\x00" in relative
        or posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or relative.startswith(("/", "\\"))
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise InvalidInputError(
            f"{what}: file name {relative!r} leaves the checkpoint directory (absolute or '..'); refused"
        )
    return Path(root) / posix


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """True when ``obj`` nests deeper than ``limit`` containers (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in item)
    return False


def check_depth(obj: Any, source: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse a parsed document (e.g. chat messages passed from Python) nested deeper than ``max_depth``."""
    if _depth_exceeds(obj, max_depth):
        raise InvalidInputError(f"{source}: nested too deeply (more than {max_depth} levels); refused")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} (not JSON)")


def loads_json(text: str | bytes, source: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON strictly; ``source`` names the file or flag in the error message."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidInputError(
            f"{source}: JSON nested too deeply (more than {max_depth} levels); refused"
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{source}: invalid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{source}: not UTF-8 text ({exc.reason})") from None
    except ValueError as exc:
        raise InvalidInputError(f"{source}: invalid JSON: {exc}") from None
    if _depth_exceeds(data, max_depth):
        raise InvalidInputError(f"{source}: JSON nested too deeply (more than {max_depth} levels); refused")
    return data


def read_json(
    path: str | os.PathLike[str],
    what: str = "JSON file",
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Read and strictly parse a JSON file (regular file, at most ``max_bytes``); errors name the file."""
    path = require_regular_file(path, what)
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidInputError(f"{path}: {what} is {size} bytes, more than the {max_bytes} accepted")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    return loads_json(data, f"{path}", max_depth=max_depth)


def read_json_object(path: str | os.PathLike[str], what: str = "JSON file", **kwargs: Any) -> dict[str, Any]:
    """:func:`read_json` whose top level must be an object."""
    data = read_json(path, what, **kwargs)
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: {what} must be a JSON object at the top level")
    return data

"""Atomic file writes: a temp file in the target's directory, fsync, ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves the old file intact. Files get mode
0644 (``mkstemp`` creates 0600; reports, goldens and dumps are meant to be read by others).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Signals held back while a temp file or directory is created and its cleanup ``try`` entered.
_DEFERRED = (signal.SIGINT, signal.SIGTERM)


class _HeldSignals:
    """Hold SIGINT/SIGTERM back from construction until :meth:`release`, then deliver what arrived.

    Python runs signal handlers in the main thread only, but the kernel may deliver a process signal to any
    thread (torch's worker threads included), so blocking it with ``pthread_sigmask`` in the main thread does
    not defer it. Instead the Python-level handlers are swapped for ones that only record the signal; on
    release the previous handlers are restored and called (raising ``KeyboardInterrupt`` or the CLI's
    ``Terminated`` there), or, for ``SIG_DFL``, the signal is sent again. Outside the main thread nothing can
    be held and nothing needs to be: handlers never run there.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in _DEFERRED:
                self.previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def release(self) -> None:
        """Restore the handlers and deliver the signals that arrived while held (once each)."""
        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(self.received):
            handler = previous.get(sig)
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    held = _HeldSignals()  # see temp_dir: no leak between the create and the cleanup ``try``
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except BaseException:
        held.release()
        raise
    try:
        held.release()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` (``\\n`` line ends) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Write ``obj`` as strict JSON (non-finite floats as strings, never ``NaN`` literals) atomically."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    atomic_write_text(path, text)


@contextmanager
def temp_dir(
    prefix: str, directory: str | os.PathLike[str] | None = None, *, keep_on_success: bool = False
) -> Iterator[Path]:
    """A scratch directory that is removed on exit (on success too unless ``keep_on_success``), also when
    SIGINT/SIGTERM interrupt the work.

    ``tempfile.TemporaryDirectory`` leaks its directory when a signal lands between the ``mkdir`` and the
    ``with``; here SIGINT/SIGTERM are held back (:class:`_HeldSignals`) from before the ``mkdir`` until the
    cleanup ``try`` is entered, so a pending signal is delivered inside it.
    """
    held = _HeldSignals()
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    except BaseException:
        held.release()
        raise
    ok = False
    try:
        held.release()  # a signal that arrived meanwhile raises here, inside the try
        yield path
        ok = True
    finally:
        if not (ok and keep_on_success):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: Path, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` on success, delete it on any failure
    or interruption (SIGINT/SIGTERM included). ``out`` must not exist or be an empty directory."""
    from gemma4.errors import InvalidInputError

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"{flag} {out}: cannot create the output directory ({exc})") from exc
    with temp_dir(f".{out.name}.tmp-", out.parent, keep_on_success=True) as tmp:
        try:
            yield tmp
            try:
                os.replace(tmp, out)
            except OSError as exc:
                raise InvalidInputError(f"{flag} {out}: cannot move the result into place ({exc})") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

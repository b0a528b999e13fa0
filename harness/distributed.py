"""A small multi-process runner for CPU tests and the CLI: gloo, forked workers, one deadline per run.

Forking after torch/megatron are imported costs ~0.3 s per run against ~8-16 s for spawn
(megatron-cpu.md §4.3). Each worker:

* sets ``torch.set_num_threads(1)`` first (libgomp is not fork-safe once the parent ran threaded ops),
* drops any process group / Megatron parallel state inherited from the parent,
* joins a fresh gloo group through a ``FileStore`` in a private temp dir (no ports, so concurrent runs and
  test workers never collide),
* initialises Megatron's model parallel state with the requested TP/CP/EP sizes,
* runs ``fn(rank, world_size, *args)`` and sends back its (picklable) result, or its traceback, first error
  line and the time it raised.

The parent reads the ranks as they report. When a rank fails, the others get a few seconds to report (a
rank blocked in a collective usually gets a gloo error once its peer is gone) and are then killed; when the
deadline passes, the ranks that did not report dump their Python stacks (``faulthandler`` on SIGUSR1) and are
killed. Only processes this runner started are ever signalled.

A failure raises :class:`DistributedRunError`: its ``str()`` is a short paragraph naming the root-cause
rank (the first that raised or died, or the ranks that missed the deadline while not waiting in a
collective) and the path of a log with every rank's full traceback or stack. Ranks that failed only because a
peer died (gloo "Connection closed by peer", timeouts) are listed as "also stopped", not blamed.

The deadline: ``run_distributed(..., timeout=S)``, else ``$GEMMA4_RANK_DEADLINE_S``, else
:data:`DEFAULT_DEADLINE_S` (:func:`resolve_deadline`).
"""

from __future__ import annotations

import faulthandler
import io
import itertools
import math
import multiprocessing as mp
import os
import re
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_connections
from pathlib import Path
from typing import Any

import torch

from gemma4.atomic_io import temp_dir

#: Seconds a multi-process run may take before its unfinished ranks are killed (the CLI's ``--deadline``).
DEFAULT_DEADLINE_S = 300.0
#: Environment variable overriding :data:`DEFAULT_DEADLINE_S` (an explicit ``timeout=`` argument wins).
DEADLINE_ENV = "GEMMA4_RANK_DEADLINE_S"
#: Prefix of the directory (in the system temp dir) that keeps the per-rank log of a failed run.
LOG_DIR_PREFIX = "gemma4-rank-logs-"
#: After the first failure, how long the other ranks get to report before they are killed.
GRACE_S = 3.0
#: How long to wait for hung ranks to write their stacks (SIGUSR1 -> faulthandler) before killing them.
_STACK_WAIT_S = 1.5

# Errors a rank gets because a peer died or stopped answering (gloo transport errors, collective timeouts).
_PEER_ERROR = re.compile(
    r"connection (closed|reset|refused) by peer|broken pipe|econnreset|epipe|timed out|timeout"
    r"|connectfullmesh|socket (closed|timeout)|read error|write error|remote worker crash",
    re.IGNORECASE,
)
# A Python stack inside torch.distributed: the rank is waiting in a collective (or store) for a peer.
_IN_COLLECTIVE = re.compile(r"torch[/\\]distributed[/\\]")
_MAX_LINE = 300
_log_counter = itertools.count()


def resolve_deadline(timeout: float | None = None) -> float:
    """The deadline in seconds of a run: ``timeout`` if given, else ``$GEMMA4_RANK_DEADLINE_S``, else
    :data:`DEFAULT_DEADLINE_S`. Raises :class:`~gemma4.errors.InvalidInputError` for a value that is not a
    finite number > 0 (the message names the argument or the variable)."""
    from gemma4.errors import InvalidInputError

    if timeout is not None:
        source, raw = "the deadline (--deadline / timeout=)", timeout
    elif os.environ.get(DEADLINE_ENV, "").strip():
        source, raw = f"${DEADLINE_ENV}", os.environ[DEADLINE_ENV].strip()
    else:
        return DEFAULT_DEADLINE_S
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{source} must be a number of seconds > 0, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"{source} must be a number of seconds > 0, got {raw!r}")
    return value


class DistributedRunError(RuntimeError):
    """One or more ranks of a multi-process run failed, died or missed the deadline.

    ``str()`` is :meth:`summary` (at most 6 lines); :attr:`log_path` holds every rank's full traceback (or
    Python stack, for a rank killed at the deadline). Attributes:

    * ``rank``: the root-cause rank (first of ``failed_ranks``),
    * ``failed_ranks``: the blamed ranks, root cause first: the ranks that raised or died on their own (in the
      order they did), or, for a hang, the ranks that missed the deadline while not waiting in a collective,
    * ``also_stopped``: ranks that failed or were killed only because a peer failed (gloo errors, waiting in
      a collective, still running when the root cause failed),
    * ``reason``: what the root cause did: ``"exception"``, ``"crash"`` (died without a Python exception)
      or ``"deadline"``,
    * ``first_lines``: ``{rank: first error line}`` of every rank that did not succeed, e.g.
      ``"ValueError: boom"``,
    * ``world_size``, ``parallelism``, ``deadline_s``,
    * ``log_path``: the per-rank log (``None`` if it could not be written; ``details`` has its text).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        failed_ranks: tuple[int, ...] = (),
        also_stopped: tuple[int, ...] = (),
        reason: str = "exception",
        first_lines: dict[int, str] | None = None,
        world_size: int = 0,
        parallelism: Parallelism | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
        log_path: Path | None = None,
        details: str = "",
        log_error: str | None = None,
    ) -> None:
        self.message = message  # a plain message (no rank data) replaces the summary
        self.failed_ranks = tuple(failed_ranks)
        self.rank = self.failed_ranks[0] if self.failed_ranks else None
        self.also_stopped = tuple(also_stopped)
        self.reason = reason
        self.first_lines = dict(first_lines or {})
        self.world_size = world_size
        self.parallelism = parallelism
        self.deadline_s = deadline_s
        self.log_path = log_path
        self.details = details
        self.log_error = log_error
        super().__init__(self.summary())

    def __str__(self) -> str:
        return self.summary()

    def __reduce__(self) -> tuple[Any, ...]:  # keyword arguments: pickle through the attributes
        return (_restore_error, (dict(self.__dict__),))

    def summary(self) -> str:
        """One short paragraph (at most 6 lines): who failed, how, and where the full log is."""
        if self.message is not None or self.rank is None:
            return self.message or "a multi-process run failed"
        where = f"{self.world_size} ({_layout(self.parallelism)})"
        root = self.rank
        lines: list[str] = []
        if self.reason == "deadline":
            lines.append(
                f"{_ranks(self.failed_ranks)} of {where} did not finish within the "
                f"{self.deadline_s:g} s deadline (raise it with --deadline SECONDS or ${DEADLINE_ENV})"
            )
            if self.also_stopped:
                lines.append(f"also stopped (waiting in a collective): {_ranks(self.also_stopped)}")
        else:
            verb = "failed:" if self.reason == "exception" else ""
            lines.append(" ".join(x for x in (f"rank {root} of {where}", verb, self.first_lines[root]) if x))
            others = [r for r in self.failed_ranks if r != root]
            if others:
                lines.append(f"{_ranks(others)} failed too, first: {self.first_lines[others[0]]}")
            if self.also_stopped:
                lines.append(f"also stopped (a peer failed): {_ranks(self.also_stopped)}")
        if self.log_path is not None:
            lines.append(f"full tracebacks of every rank: {self.log_path}")
        else:
            lines.append(f"(could not write the rank log: {self.log_error}; see the error's .details)")
        return "\n".join(lines)


def _restore_error(state: dict[str, Any]) -> DistributedRunError:
    error = DistributedRunError.__new__(DistributedRunError)
    error.__dict__.update(state)
    RuntimeError.__init__(error, error.summary())
    return error


def _layout(par: Parallelism | None) -> str:
    if par is None:
        return "?"
    parts = [f"{k}={v}" for k, v in (("tp", par.tp), ("cp", par.cp), ("ep", par.ep)) if v > 1]
    if par.sequence_parallel:
        parts.append("sp")
    return ", ".join(parts) or "tp=1"


def _ranks(ranks: tuple[int, ...] | list[int], limit: int = 12) -> str:
    ranks = list(ranks)
    shown = ", ".join(str(r) for r in ranks[:limit]) + (
        f", ... ({len(ranks)} ranks)" if len(ranks) > limit else ""
    )
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


@dataclass(frozen=True)
class Parallelism:
    """Model-parallel sizes of a run (world size = tp * cp * ep, data parallel 1)."""

    tp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.ep


# Process-group objects inherited from the parent. Their destructors would join gloo threads that do not
# exist in a forked child (segfault), so the child keeps them referenced and never destroys them.
_INHERITED: list[Any] = []


def _reset_inherited_state() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d as c10d

    _INHERITED.append({k: v for k, v in vars(parallel_state).items() if k.isupper()})
    # destroy_model_parallel() would call destroy_process_group on the parent's gloo groups: forget those
    # handles first, then let it reset its globals.
    for name in dir(parallel_state):
        if name.startswith("_") and name.endswith("_GLOO"):
            setattr(parallel_state, name, None)
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        world = c10d._world
        _INHERITED.append(
            (
                world.default_pg,
                dict(world.pg_map),
                dict(world.pg_names),
                dict(world.pg_group_ranks),
                dict(world.pg_backend_config),
                dict(world.pg_to_tag),
                dict(world.tags_to_pg),
            )
        )
        world.default_pg = None
        for table in (
            world.pg_map,
            world.pg_names,
            world.pg_group_ranks,
            world.pg_backend_config,
            world.pg_to_tag,
            world.tags_to_pg,
        ):
            table.clear()


def _encode(obj: Any) -> bytes:
    """Results travel as ``torch.save`` bytes (tensors, numbers, strings, containers): no pickle on load,
    and no shared-memory handles that would die with the worker."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


# The worker's stack file, kept open for faulthandler (SIGUSR1 at the deadline, fatal signals).
_STACK_FILE: list[Any] = []


def _first_error_line(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."


def _peer_caused(exc: BaseException) -> bool:
    """Does ``exc`` look like a consequence of a peer's death (gloo transport error, collective timeout)?"""
    import torch.distributed as dist

    try:
        return any(
            e is not None and (isinstance(e, dist.DistError) or bool(_PEER_ERROR.search(str(e))))
            for e in (exc, exc.__cause__)
        )
    except Exception:  # noqa: BLE001 - an exception whose str() fails is not a gloo error
        return False


def _worker(
    rank: int, world: int, store_path: str, stack_path: str, par: Parallelism, fn, args, conn
) -> None:
    try:
        stack_file = open(stack_path, "w")  # noqa: SIM115 - stays open until os._exit
        _STACK_FILE.append(stack_file)
        faulthandler.enable(file=stack_file, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=False)
        torch.set_num_threads(1)
        _reset_inherited_state()
        import torch.distributed as dist
        from megatron.core import parallel_state

        from gemma4.cpu_shims import install_cpu_shims

        install_cpu_shims()
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            context_parallel_size=par.cp,
            expert_model_parallel_size=par.ep,
        )
        result = fn(rank, world, *args)
        conn.send_bytes(_encode(("ok", result)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        at_ns = time.monotonic_ns()  # CLOCK_MONOTONIC is system-wide: comparable across the ranks
        try:
            payload = {
                "traceback": traceback.format_exc(),
                "first_line": _first_error_line(exc),
                "at_ns": at_ns,
                "peer": _peer_caused(exc),
            }
            conn.send_bytes(_encode(("error", payload)))
        except BaseException:  # noqa: BLE001, S110 - the parent then reports the rank as crashed
            pass
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers inherited from the parent (pytest, megatron)


@dataclass
class _RankState:
    status: str = "running"  # running -> ok | exception | crash
    first_line: str = ""
    traceback: str = ""
    at_ns: int | None = None  # when it raised (worker clock) or was seen dead (parent clock)
    peer: bool = False  # the error looks caused by a peer's death
    exit_status: str = ""
    stack: str = ""  # faulthandler output: stack at the deadline, or at a fatal signal


def _exit_status(code: int | None) -> str:
    if code is None:
        return "no exit status (still running after closing its result pipe)"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-code} ({name})"


def _collect(
    procs: list[Any], conns: list[Any], states: list[_RankState], results: list[Any], deadline_ns: int
):
    """Read the ranks' reports as they come, until all reported, the deadline passed, or ``GRACE_S`` after
    the first failure."""
    pending = {conn: rank for rank, conn in enumerate(conns)}
    stop_ns = deadline_ns
    while pending:
        remaining = (stop_ns - time.monotonic_ns()) / 1e9
        if remaining <= 0:
            return
        for conn in wait_for_connections(list(pending), timeout=remaining):
            rank = pending.pop(conn)
            state = states[rank]
            try:
                status, payload = _decode(conn.recv_bytes())
            except Exception:  # noqa: BLE001 - EOF, a torn message: the rank died without reporting
                state.status, state.at_ns = "crash", time.monotonic_ns()
                procs[rank].join(timeout=5)
                state.exit_status = _exit_status(procs[rank].exitcode)
                state.first_line = f"died without a Python exception: {state.exit_status}"
            else:
                if status == "ok":
                    state.status = "ok"
                    results[rank] = payload
                else:
                    state.status = "exception"
                    state.first_line = payload["first_line"]
                    state.traceback = payload["traceback"]
                    state.at_ns = payload["at_ns"]
                    state.peer = payload["peer"]
            if state.status != "ok":
                stop_ns = min(stop_ns, time.monotonic_ns() + int(GRACE_S * 1e9))


def _dump_stacks(procs: list[Any], ranks: list[int], stack_paths: list[str]) -> None:
    """Ask still-running ranks for their Python stacks (faulthandler on SIGUSR1); wait until written."""
    asked = []
    for rank in ranks:
        if procs[rank].is_alive():  # an unjoined child stays a zombie: its pid cannot be reused meanwhile
            try:
                os.kill(procs[rank].pid, signal.SIGUSR1)
                asked.append(rank)
            except ProcessLookupError:
                pass
    end = time.monotonic() + _STACK_WAIT_S
    last: dict[int, int] = {}
    while asked and time.monotonic() < end:
        sizes = {r: _size(stack_paths[r]) for r in asked}
        if all(sizes[r] > 0 and sizes[r] == last.get(r) for r in asked):
            return
        last = sizes
        time.sleep(0.05)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_stack(path: str) -> str:
    """A rank's faulthandler output, without the frames it inherited from the parent by forking."""
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    kept, skipping = [], False
    for line in lines:
        if not line.startswith("  "):  # "Current thread 0x... (most recent call first):"
            skipping = False
        if not skipping:
            kept.append(line)
        if line.startswith("  File ") and line.endswith(" in _worker") and __file__ in line:
            skipping = True
    return "\n".join(kept)


def run_distributed(
    fn: Callable[..., Any],
    par: Parallelism,
    *args: Any,
    timeout: float | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``par.world_size`` forked gloo ranks; return results by rank.

    ``timeout``: the deadline in seconds for the whole run (``None``: :func:`resolve_deadline`). On any
    failure raises :class:`DistributedRunError`; its per-rank log goes to ``log_dir`` if given, else to a new
    ``gemma4-rank-logs-*`` directory in the system temp dir, and is kept.
    """
    import megatron.core.parallel_state  # noqa: F401 - import before forking so children inherit it

    deadline_s = resolve_deadline(timeout)
    ctx = mp.get_context("fork")
    world = par.world_size
    states = [_RankState() for _ in range(world)]
    results: list[Any] = [None] * world
    started_wall = time.time()
    started_ns = time.monotonic_ns()
    with temp_dir("gemma4-dist-") as tmp_path:
        tmp = str(tmp_path)
        store_path = os.path.join(tmp, "store")
        stack_paths = [os.path.join(tmp, f"rank{rank}.stack") for rank in range(world)]
        procs: list[Any] = []
        conns: list[Any] = []
        try:
            for rank in range(world):
                parent_conn, child_conn = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=_worker,
                    args=(rank, world, store_path, stack_paths[rank], par, fn, args, child_conn),
                    daemon=True,
                )
                conns.append(parent_conn)
                p.start()
                child_conn.close()
                procs.append(p)
            _collect(procs, conns, states, results, started_ns + int(deadline_s * 1e9))
            running = [r for r, s in enumerate(states) if s.status == "running"]
            if running:
                _dump_stacks(procs, running, stack_paths)
        finally:
            for p in procs:  # only the workers started here
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
            for conn in conns:
                conn.close()
        if all(s.status == "ok" for s in states):
            return results
        for rank, state in enumerate(states):
            if state.status != "ok":
                state.stack = _read_stack(stack_paths[rank])
    raise _make_error(states, par, deadline_s, started_wall, started_ns, log_dir)


def _make_error(
    states: list[_RankState],
    par: Parallelism,
    deadline_s: float,
    started_wall: float,
    started_ns: int,
    log_dir: str | os.PathLike[str] | None,
) -> DistributedRunError:
    """Blame the root cause, list the ranks stopped by it, write the log."""
    world = len(states)

    def by_time(ranks: list[int]) -> list[int]:
        return sorted(ranks, key=lambda r: (states[r].at_ns or 0, r))

    own = by_time([r for r, s in enumerate(states) if s.status in ("exception", "crash") and not s.peer])
    peer = by_time([r for r, s in enumerate(states) if s.status == "exception" and s.peer])
    running = [r for r, s in enumerate(states) if s.status == "running"]
    if own or peer:
        failed = own or peer[:1]
        reason = states[failed[0]].status
        stopped = sorted(set(peer + running) - set(failed))
        for r in running:
            states[r].first_line = f"still running after rank {failed[0]} failed; killed"
    else:  # the deadline passed: blame the ranks not waiting in a collective for a peer
        waiting = [r for r in running if _IN_COLLECTIVE.search(states[r].stack)]
        failed = [r for r in running if r not in waiting] or running
        stopped = [r for r in waiting if r not in failed]
        reason = "deadline"
        for r in running:
            states[r].first_line = f"did not finish within the {deadline_s:g} s deadline" + (
                "; was waiting in a collective" if r in stopped else ""
            )
    first_lines = {r: s.first_line for r, s in enumerate(states) if s.status != "ok"}

    def make(log_path: Path | None, details: str, log_error: str | None = None) -> DistributedRunError:
        return DistributedRunError(
            failed_ranks=tuple(failed),
            also_stopped=tuple(stopped),
            reason=reason,
            first_lines=first_lines,
            world_size=world,
            parallelism=par,
            deadline_s=deadline_s,
            log_path=log_path,
            details=details,
            log_error=log_error,
        )

    if log_dir is None:
        path = None
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started_wall))
        path = Path(log_dir) / f"gemma4-ranks-{stamp}-{os.getpid()}-{next(_log_counter)}.log"
    # The summary names the log's path, and the log starts with the summary: fix the path first.
    try:
        if path is None:
            path = Path(tempfile.mkdtemp(prefix=LOG_DIR_PREFIX)) / "ranks.log"
        error = make(path, "")
        text = _log_text(error, states, failed, stopped, started_wall, started_ns)
        from gemma4.atomic_io import atomic_write_text

        atomic_write_text(path, text)
    except OSError as exc:
        error = make(None, "")
        return make(None, _log_text(error, states, failed, stopped, started_wall, started_ns), str(exc))
    error.details = text
    return error


def _log_text(
    error: DistributedRunError,
    states: list[_RankState],
    failed: list[int],
    stopped: list[int],
    started_wall: float,
    started_ns: int,
) -> str:
    world = len(states)
    out = [
        "gemma4-harness multi-process run failed",
        f"ranks: {world} ({_layout(error.parallelism)}); deadline {error.deadline_s:g} s "
        f"(--deadline / ${DEADLINE_ENV}); started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started_wall))}",
        "",
        error.summary(),
        "",
    ]
    for rank, state in enumerate(states):
        if state.status == "ok":
            label = "ok"
        elif rank in failed:
            label = "FAILED (root cause)" if rank == failed[0] else "FAILED"
        else:
            label = "also stopped (a peer failed)" if error.reason != "deadline" else "also stopped (waiting)"
        when = f" at +{(state.at_ns - started_ns) / 1e9:.2f} s" if state.at_ns is not None else ""
        head = f"===== rank {rank}: {label}{when}" + (f" - {state.first_line}" if state.first_line else "")
        out.append(head)
        if state.traceback:
            out.append(state.traceback.rstrip())
        if state.status == "crash":
            out.append(f"no Python exception; exit status: {state.exit_status}")
        if state.stack:
            what = "at the fatal signal" if state.status == "crash" else "when it was killed"
            out.append(f"Python stack {what} (faulthandler, most recent call first):\n{state.stack}")
        out.append("")
    return "\n".join(out)

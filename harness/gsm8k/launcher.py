"""Run the plan's steps, each in a process group this process owns, with a deadline and a stall limit.

* Every step starts in a new session (``start_new_session=True``): its process group is ours, and on
  timeout, stall (no output line for ``stall_timeout_s``), interrupt or error the launcher sends SIGTERM to
  that group, waits, then SIGKILL, and also kills any descendant that left the group (found through the
  process tree of the step, so only processes this run started). Nothing is ever killed by name.
* Output (stdout and stderr merged) goes line by line to the step's log file and to ``on_line`` (the
  metric parser); the log is what the gates read afterwards.
* While the train step runs, its process tree is checked for listening sockets outside 127.0.0.0/8 and
  ``::1`` every ``watch_interval_s`` seconds (psutil); findings are reported by the ``localhost`` gate.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.gsm8k.command import Step, resolved_env
from harness.gsm8k.gates import RunOutcome

KILL_GRACE_S = 20.0
EXIT_DRAIN_S = 2.0  # output still read after the step's own process exited


@dataclass
class StepRun:
    """What one step did."""

    name: str
    outcome: RunOutcome
    log: Path


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for wildcard and every other address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def _tree(pid: int) -> list:
    """``pid`` and its descendants as ``psutil.Process`` objects (empty without psutil or process)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def non_loopback_listeners(pid: int) -> list[str]:
    """``"name[pid] ip:port"`` for every LISTEN socket of ``pid``'s process tree outside loopback."""
    import psutil

    found = []
    for proc in _tree(pid):
        try:
            conns = (
                proc.net_connections(kind="inet")
                if hasattr(proc, "net_connections")
                else proc.connections("inet")
            )
            name = proc.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr and not is_loopback(c.laddr.ip):
                found.append(f"{name}[{proc.pid}] {c.laddr.ip}:{c.laddr.port}")
    return found


def terminate_group(proc: subprocess.Popen, known: list | None = None, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the step's process group and every descendant seen (``known`` plus the current tree), wait up
    to ``grace_s`` for all of them, then SIGKILL what is left. ``psutil.Process`` objects carry their start
    time, so a recycled pid is never signalled."""
    targets = {p.pid: p for p in [*(known or []), *_tree(proc.pid)[1:]]}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for child in targets.values():
            try:
                if child.is_running():
                    child.send_signal(sig)
            except Exception:  # noqa: BLE001 - already gone
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline:
            if (
                proc.poll() is not None
                and not _group_alive(proc.pid)
                and not any(map(_alive, targets.values()))
            ):
                return
            time.sleep(0.1)
    proc.wait(timeout=10)


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:  # noqa: BLE001
        return False


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process is in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        import psutil
    except ImportError:
        return True
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def run_step(
    step: Step,
    log_path: Path,
    timeout_s: float,
    stall_timeout_s: float,
    on_line: Callable[[str], None] | None = None,
    watch_interval_s: float = 10.0,
    watch_localhost: bool = False,
) -> StepRun:
    """Run one step to completion or until a limit; the outcome says how it ended."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    violations: set[str] = set()
    seen: dict[int, object] = {}  # every descendant observed while the step ran
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"# {step.shell()}\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                step.argv,
                cwd=step.cwd,
                env=resolved_env(step),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
            )
        except OSError as exc:
            return StepRun(step.name, RunOutcome(None, "not-started", 0.0, str(exc)), log_path)
        lines: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        reason, detail = "exited", ""
        last_output = last_watch = time.monotonic()
        exited_at = 0.0
        try:
            while True:
                now = time.monotonic()
                if now - start > timeout_s:
                    reason, detail = "timeout", f"after {timeout_s:.0f} s"
                    break
                if now - last_output > stall_timeout_s:
                    reason, detail = "hang", f"no output for {stall_timeout_s:.0f} s"
                    break
                if now - last_watch > watch_interval_s:
                    seen.update({p.pid: p for p in _tree(proc.pid)[1:]})
                    if watch_localhost:
                        violations.update(non_loopback_listeners(proc.pid))
                    last_watch = now
                try:
                    line = lines.get(timeout=min(1.0, max(0.05, stall_timeout_s / 4)))
                except queue.Empty:
                    # The step exited but a child it left behind still holds the pipe: stop reading soon.
                    if proc.poll() is not None:
                        exited_at = exited_at or now
                        if now - exited_at > EXIT_DRAIN_S:
                            break
                    continue
                if line is None:
                    break
                last_output = time.monotonic()
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line)
        except KeyboardInterrupt:
            reason, detail = "interrupted", "KeyboardInterrupt"
        finally:
            seen.update({p.pid: p for p in _tree(proc.pid)[1:]})
            if reason != "exited":
                terminate_group(proc, list(seen.values()))
            else:
                try:
                    proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
                except subprocess.TimeoutExpired:
                    reason, detail = "timeout", "output closed but the process did not exit"
                    terminate_group(proc, list(seen.values()))
                if _group_alive(proc.pid) or any(map(_alive, seen.values())):
                    terminate_group(proc, list(seen.values()))  # leftovers of this run (daemonised children)
            reader.join(timeout=5)
        code = proc.returncode if reason == "exited" else None
        log.write(f"# {step.name}: {reason} {detail} exit={proc.returncode}\n")
    outcome = RunOutcome(code, reason, time.monotonic() - start, detail, sorted(violations))
    return StepRun(step.name, outcome, log_path)

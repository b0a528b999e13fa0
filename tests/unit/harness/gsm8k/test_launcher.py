"""The launcher on a fake slime: process-group ownership, deadlines, hang detection, the log, localhost checks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from harness.gsm8k.command import Step
from harness.gsm8k.launcher import is_loopback, non_loopback_listeners, run_step
from harness.gsm8k.metrics import parse_lines

FAKE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    mode, pids = sys.argv[1], sys.argv[2]
    def spawn(**kw):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], **kw)
        with open(pids, "a") as f:
            f.write(f"{p.pid}\\n")
    print("step 0: {'train/ppo_kl': 0.0, 'train/train_rollout_logprob_abs_diff': 0.004}", flush=True)
    print("rollout 0: {'rollout/raw_reward': 0.75}", flush=True)
    if mode == "pass":
        sys.exit(0)
    if mode == "fail":
        print("Traceback: CUDA error", flush=True)
        sys.exit(3)
    if mode == "orphan":                 # leaves a setsid child behind and exits 0
        spawn(start_new_session=True)
        time.sleep(1.0)
        sys.exit(0)
    spawn()                              # a grandchild in our process group
    spawn(start_new_session=True)        # one that left the group (setsid)
    if mode == "chatty":
        while True:
            print("still working", flush=True)
            time.sleep(0.05)
    time.sleep(300)                      # hang: no more output
    """
)


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_slime.py"
    script.write_text(FAKE)
    pids = tmp_path / "pids"

    def step(mode: str) -> Step:
        return Step(
            "train", [sys.executable, str(script), mode, str(pids)], {"PYTHONUNBUFFERED": "1"}, tmp_path
        )

    return step, pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_clean_run_is_logged_and_parsed(fake, tmp_path):
    step, _ = fake
    lines = []
    run = run_step(step("pass"), tmp_path / "train.log", 60, 30, on_line=lines.append)
    assert (run.outcome.reason, run.outcome.exit_code) == ("exited", 0)
    metrics = parse_lines(run.log.read_text().splitlines())
    assert metrics.series["step"][0]["train/ppo_kl"] == 0.0 and len(lines) == 2
    assert run.log.read_text().startswith("# cd ")  # the exact command heads the log


def test_a_failing_run_keeps_its_exit_code(fake, tmp_path):
    step, _ = fake
    run = run_step(step("fail"), tmp_path / "train.log", 60, 30)
    assert (run.outcome.reason, run.outcome.exit_code) == ("exited", 3)
    assert "CUDA error" in run.log.read_text()


@pytest.mark.parametrize(("mode", "reason"), [("hang", "hang"), ("chatty", "timeout")])
def test_hang_and_timeout_kill_everything_the_run_started_and_nothing_else(fake, tmp_path, mode, reason):
    step, pids = fake
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the run's
    try:
        t0 = time.monotonic()
        run = run_step(step(mode), tmp_path / "train.log", 4.0, 1.5, watch_interval_s=0.2)
        assert run.outcome.reason == reason and run.outcome.exit_code is None
        assert time.monotonic() - t0 < 60
        started = [int(p) for p in pids.read_text().split()]
        assert len(started) == 2
        deadline = time.monotonic() + 10
        while any(map(_alive, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, started)), "a process the run started survived"
        assert bystander.poll() is None, "the launcher killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


def test_children_left_behind_by_a_finished_run_are_stopped(fake, tmp_path):
    """A daemonised (setsid) child outlives the run's process group; the launcher saw it and stops it."""
    step, pids = fake
    run = run_step(step("orphan"), tmp_path / "train.log", 60, 30, watch_interval_s=0.1)
    assert (run.outcome.reason, run.outcome.exit_code) == ("exited", 0)
    [orphan] = [int(p) for p in pids.read_text().split()]
    deadline = time.monotonic() + 10
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(orphan)


def test_loopback_classification():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "fe80::1%eth0", "junk"]))


def test_listeners_outside_loopback_are_found(monkeypatch):
    """Fed psutil-shaped processes (no real socket is opened on a public address in a test)."""
    from collections import namedtuple

    from harness.gsm8k import launcher

    addr = namedtuple("addr", "ip port")
    conn = namedtuple("conn", "status laddr")

    class Proc:
        def __init__(self, pid, name, conns):
            self.pid, self._name, self._conns = pid, name, conns

        def name(self):
            return self._name

        def net_connections(self, kind="inet"):
            return self._conns

    tree = [
        Proc(10, "python", [conn(psutil.CONN_LISTEN, addr("127.0.0.1", 8265))]),
        Proc(
            11,
            "sglang",
            [
                conn(psutil.CONN_LISTEN, addr("0.0.0.0", 30000)),
                conn(psutil.CONN_ESTABLISHED, addr("10.1.2.3", 5)),
            ],
        ),
        Proc(
            12,
            "raylet",
            [conn(psutil.CONN_LISTEN, addr("::", 6379)), conn(psutil.CONN_LISTEN, addr("::1", 6380))],
        ),
    ]
    monkeypatch.setattr(launcher, "_tree", lambda pid: tree)
    assert non_loopback_listeners(10) == ["sglang[11] 0.0.0.0:30000", "raylet[12] :::6379"]


def test_a_missing_program_never_started(tmp_path):
    run = run_step(Step("train", [str(tmp_path / "nope")], {}, tmp_path), tmp_path / "l.log", 5, 5)
    assert run.outcome.reason == "not-started" and run.outcome.exit_code is None

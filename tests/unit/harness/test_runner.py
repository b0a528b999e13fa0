"""The forked gloo runner: results by rank, a short error naming the root-cause rank, a log with every
rank's traceback, a deadline that kills hung ranks, no stray processes."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from gemma4.errors import InvalidInputError
from harness import distributed
from harness.distributed import DistributedRunError, Parallelism, resolve_deadline, run_distributed

pytestmark = pytest.mark.xdist_group("multiprocess")


def _collectives(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(rank + 1)], dtype=torch.float64)
    dist.all_reduce(t)
    return {
        "rank": rank,
        "sum": float(t),
        "tp": ps.get_tensor_model_parallel_rank(),
        "cp": ps.get_context_parallel_rank(),
        "tensor": torch.full((2,), float(rank)),
    }


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    return rank


def _fail_on_rank_one_while_peers_wait(rank, world):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("planted failure on rank 1")
    dist.all_reduce(torch.ones(1))  # the peers block here until rank 1's death breaks the collective
    return rank


def _fail_everywhere_rank_one_first(rank, world):
    if rank != 1:
        time.sleep(0.5)
    raise KeyError(f"planted on rank {rank}")


def _hang_on_rank_one(rank, world):
    if rank == 1:
        time.sleep(60)
    return rank


def _hang_on_rank_one_while_peer_waits(rank, world):
    import torch.distributed as dist

    if rank == 1:
        time.sleep(60)
    dist.barrier()
    return rank


def _exit_on_rank_one(rank, world, how):
    import torch.distributed as dist

    if rank == 1:
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return rank


def _sleep(rank, world):
    time.sleep(600)


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def _run_failing(fn, par, *args, tmp_path, **kwargs) -> DistributedRunError:
    """Run ``fn``, expect a DistributedRunError, check the common contract, return the error."""
    before = _children()
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(fn, par, *args, log_dir=tmp_path, **kwargs)
    err = info.value
    err.elapsed_s = time.monotonic() - start
    assert isinstance(err, RuntimeError)
    assert _children() <= before, "a worker outlived the run"
    summary = err.summary()
    assert str(err) == summary
    assert len(summary.splitlines()) <= 6, summary
    assert err.world_size == par.world_size
    assert err.log_path is not None and err.log_path.is_file() and err.log_path.parent == tmp_path
    assert str(err.log_path) in summary
    return err


@pytest.mark.parametrize("par", [Parallelism(tp=2), Parallelism(cp=2), Parallelism(tp=2, cp=2)], ids=str)
def test_results_come_back_by_rank(par):
    results = run_distributed(_collectives, par)
    world = par.world_size
    assert [r["rank"] for r in results] == list(range(world))
    assert all(r["sum"] == world * (world + 1) / 2 for r in results)
    assert sorted((r["tp"], r["cp"]) for r in results) == sorted(
        (t, c) for t in range(par.tp) for c in range(par.cp)
    )
    assert torch.equal(results[1]["tensor"], torch.ones(2))


def test_error_names_the_rank_and_its_first_line_and_logs_the_traceback(tmp_path):
    err = _run_failing(_fail_on_rank_one, Parallelism(cp=2), tmp_path=tmp_path)
    assert (err.rank, err.failed_ranks, err.also_stopped, err.reason) == (1, (1,), (), "exception")
    assert err.first_lines == {1: "ValueError: planted failure on rank 1"}
    summary = err.summary()
    assert summary.startswith("rank 1 of 2 (cp=2) failed: ValueError: planted failure on rank 1")
    assert "Traceback" not in summary and "rank 0" not in summary
    log = err.log_path.read_text()
    assert "Traceback (most recent call last)" in log
    assert 'raise ValueError("planted failure on rank 1")' in log and "in _fail_on_rank_one" in log
    assert "rank 0: ok" in log


def test_log_goes_to_the_temp_dir_by_default_and_is_kept():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_one, Parallelism(tp=2))
    path = info.value.log_path
    try:
        assert path is not None and path.is_file() and path.name == "ranks.log"
        assert path.parent.parent == Path(tempfile.gettempdir())
        assert path.parent.name.startswith("gemma4-rank-logs-")
        assert "planted failure on rank 1" in path.read_text()
    finally:
        if path is not None and path.parent.name.startswith("gemma4-rank-logs-"):
            shutil.rmtree(path.parent)


def test_the_first_rank_to_raise_is_the_root_cause(tmp_path):
    err = _run_failing(_fail_everywhere_rank_one_first, Parallelism(tp=2), tmp_path=tmp_path)
    assert (err.rank, err.failed_ranks, err.also_stopped) == (1, (1, 0), ())
    assert err.summary().splitlines()[:2] == [
        "rank 1 of 2 (tp=2) failed: KeyError: 'planted on rank 1'",
        "rank 0 failed too, first: KeyError: 'planted on rank 0'",
    ]


def test_the_error_pickles_and_survives_an_unwritable_log_dir(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_one, Parallelism(tp=2), log_dir=not_a_dir)
    err = info.value
    assert err.log_path is None and err.rank == 1
    assert "could not write the rank log" in str(err)
    assert 'raise ValueError("planted failure on rank 1")' in err.details
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.failed_ranks == (1,) and copy.first_lines == err.first_lines
    assert str(DistributedRunError("plain message")) == "plain message"


def test_only_the_raising_rank_is_blamed_when_peers_die_in_a_collective(tmp_path):
    err = _run_failing(_fail_on_rank_one_while_peers_wait, Parallelism(tp=2, cp=2), tmp_path=tmp_path)
    assert (err.rank, err.failed_ranks, err.reason) == (1, (1,), "exception")
    assert err.also_stopped == (0, 2, 3)
    assert err.first_lines[1] == "ValueError: planted failure on rank 1"
    summary = err.summary()
    assert summary.startswith("rank 1 of 4 (tp=2, cp=2) failed: ValueError: planted failure on rank 1")
    assert "also stopped" in summary and "0, 2, 3" in summary
    assert err.elapsed_s < 20  # the peers do not wait for the deadline
    log = err.log_path.read_text()
    for rank in (0, 2, 3):
        assert f"rank {rank}: also stopped" in log


def test_a_hung_rank_is_named_and_killed(tmp_path):
    err = _run_failing(_hang_on_rank_one, Parallelism(tp=2), tmp_path=tmp_path, timeout=3)
    assert (err.rank, err.failed_ranks, err.also_stopped, err.reason) == (1, (1,), (), "deadline")
    assert err.deadline_s == 3
    assert err.summary().startswith("rank 1 of 2 (tp=2) did not finish within the 3 s deadline")
    assert "--deadline" in err.summary()
    assert err.elapsed_s < 15
    log = err.log_path.read_text()
    assert "in _hang_on_rank_one" in log  # where the hung rank was stuck
    assert "rank 0: ok" in log


def test_a_rank_waiting_on_the_hung_one_is_not_blamed(tmp_path):
    err = _run_failing(_hang_on_rank_one_while_peer_waits, Parallelism(cp=2), tmp_path=tmp_path, timeout=3)
    assert (err.rank, err.failed_ranks, err.also_stopped, err.reason) == (1, (1,), (0,), "deadline")
    assert err.elapsed_s < 15
    assert "barrier" in err.log_path.read_text()


@pytest.mark.parametrize("how,expect", [("exit", "exit code 3"), ("kill", "signal 9 (SIGKILL)")])
def test_a_rank_dying_without_an_exception_is_named_with_its_exit_status(tmp_path, how, expect):
    err = _run_failing(_exit_on_rank_one, Parallelism(tp=2), how, tmp_path=tmp_path, timeout=60)
    assert (err.rank, err.failed_ranks, err.also_stopped, err.reason) == (1, (1,), (0,), "crash")
    assert expect in err.first_lines[1]
    assert err.summary().startswith("rank 1 of 2 (tp=2) ")
    assert expect in err.summary().splitlines()[0]
    assert err.elapsed_s < 20


def test_the_deadline_kills_every_worker_it_started(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_RANK_DEADLINE_S", "2")
    err = _run_failing(_sleep, Parallelism(tp=2), tmp_path=tmp_path)
    assert (err.failed_ranks, err.also_stopped, err.reason, err.deadline_s) == ((0, 1), (), "deadline", 2)
    assert err.summary().startswith("ranks 0, 1 of 2 (tp=2) did not finish within the 2 s deadline")
    assert err.elapsed_s < 15


def test_the_deadline_comes_from_the_argument_then_the_env_var_then_the_default(monkeypatch):
    monkeypatch.delenv("GEMMA4_RANK_DEADLINE_S", raising=False)
    assert resolve_deadline() == distributed.DEFAULT_DEADLINE_S
    assert resolve_deadline(7) == 7
    monkeypatch.setenv("GEMMA4_RANK_DEADLINE_S", "12.5")
    assert resolve_deadline() == 12.5
    assert resolve_deadline(7) == 7
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("GEMMA4_RANK_DEADLINE_S", bad)
        with pytest.raises(InvalidInputError, match="GEMMA4_RANK_DEADLINE_S"):
            resolve_deadline()
    with pytest.raises(InvalidInputError, match="deadline"):
        resolve_deadline(0)

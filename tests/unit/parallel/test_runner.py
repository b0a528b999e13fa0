"""The forked gloo runner: results by rank, readable per-rank errors, timeouts, no stray processes."""

from __future__ import annotations

import time

import psutil
import pytest
import torch

from harness.distributed import DistributedRunError, Parallelism, run_distributed

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


def _sleep(rank, world):
    time.sleep(600)


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


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


def test_error_names_the_rank_and_keeps_its_traceback():
    before = _children()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_one, Parallelism(cp=2))
    msg = str(info.value)
    assert "--- rank 1 ---" in msg and "planted failure on rank 1" in msg and "ValueError" in msg
    assert "--- rank 0 ---" not in msg
    assert _children() <= before


def test_timeout_kills_every_worker_it_started():
    before = _children()
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="timed out"):
        run_distributed(_sleep, Parallelism(tp=2), timeout=2)
    assert time.monotonic() - start < 30
    assert _children() <= before

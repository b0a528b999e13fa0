"""A small multi-process runner for CPU tests and the CLI: gloo, forked workers, per-run timeout.

Forking after torch/megatron are imported costs ~0.3 s per run against ~8-16 s for spawn
(megatron-cpu.md §4.3). Each worker:

* sets ``torch.set_num_threads(1)`` first (libgomp is not fork-safe once the parent ran threaded ops),
* drops any process group / Megatron parallel state inherited from the parent,
* joins a fresh gloo group through a ``FileStore`` in a private temp dir (no ports, so concurrent runs and
  test workers never collide),
* initialises Megatron's model parallel state with the requested TP/CP/EP sizes,
* runs ``fn(rank, world_size, *args)`` and sends back its (picklable) result or its formatted traceback.

The parent waits for all workers with one deadline; on timeout or error every worker it started is
killed (only those), and the error names each failing rank with its traceback.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class DistributedRunError(RuntimeError):
    """One or more ranks failed or timed out; the message holds each rank's error."""


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


def _worker(rank: int, world: int, store_path: str, par: Parallelism, fn, args, conn) -> None:
    try:
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
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send_bytes(_encode(("error", traceback.format_exc())))
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers inherited from the parent (pytest, megatron)


def run_distributed(
    fn: Callable[..., Any], par: Parallelism, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``par.world_size`` forked gloo ranks; return results by rank."""
    import megatron.core.parallel_state  # noqa: F401 - import before forking so children inherit it

    ctx = mp.get_context("fork")
    world = par.world_size
    with tempfile.TemporaryDirectory(prefix="gemma4-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs, conns = [], []
        for rank in range(world):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_worker, args=(rank, world, store_path, par, fn, args, child_conn), daemon=True
            )
            p.start()
            child_conn.close()
            procs.append(p)
            conns.append(parent_conn)
        results: list[Any] = [None] * world
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        try:
            for rank, conn in enumerate(conns):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not conn.poll(remaining):
                    errors[rank] = f"timed out after {timeout:.0f} s"
                    continue
                try:
                    status, payload = _decode(conn.recv_bytes())
                except EOFError:
                    errors[rank] = "worker exited without a result (crashed?)"
                    continue
                if status == "ok":
                    results[rank] = payload
                else:
                    errors[rank] = payload
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=10)
            for conn in conns:
                conn.close()
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        raise DistributedRunError(f"{len(errors)} of {world} ranks failed ({par}):\n{detail}")
    return results

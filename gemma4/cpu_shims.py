"""Minimal CPU shims for Megatron-Core 0.16 code paths that assume CUDA (see megatron-cpu.md §2.1, §5).

Installed only when no CUDA device is available, idempotently, by :func:`install_cpu_shims`:

* ``torch.cuda.current_device`` returns the CPU device and ``torch.cuda.synchronize`` is a no-op, for the
  sequence-parallel gathers, ``GlobalMemoryBuffer`` and ``dist_checkpointing`` save paths that allocate on
  ``torch.cuda.current_device()``;
* Megatron's CUDA RNG tracker is replaced by one that forks the CPU generator (dropout under
  ``get_cuda_rng_tracker().fork()``, sequence parallelism, activation recompute);
* ``_get/_set_cuda_rng_state`` (used by recompute) act on the CPU generator.

Nothing here changes numerics; the shims only redirect device and RNG bookkeeping.
"""

from __future__ import annotations

import contextlib

import torch

_INSTALLED = False


class CPURNGStatesTracker:
    """Megatron's RNG tracker interface (``add``/``fork``/``get_states``/``set_states``) over the CPU generator."""

    use_cudagraphable_rng = False
    is_inference_rng_tracker = False

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def install_cpu_shims(seed: int = 1234) -> None:
    """Install the CPU shims once (no-op when CUDA is available)."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    tracker = CPURNGStatesTracker()
    tracker.add("model-parallel-rng", seed)
    tracker.add("data-parallel-rng", seed + 1)
    tracker.add("expert-parallel-rng", seed + 2)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _INSTALLED = True

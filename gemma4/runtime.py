"""Process-level setup for running Megatron-Core models on CPU (and GPU) outside Megatron's trainer."""

from __future__ import annotations

import torch
import torch.distributed as dist


def init_single_process(tensor_model_parallel_size: int = 1) -> None:
    """Initialise a world of one (gloo, in-memory store) and Megatron's model-parallel state, once.

    Megatron's parallel linears need its process groups even at TP = 1. An in-process ``HashStore`` needs
    no port, so concurrent test workers never collide.
    """
    from megatron.core import parallel_state

    from gemma4.cpu_shims import install_cpu_shims

    install_cpu_shims()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

"""The one precision rule every Gemma 4 module here follows.

HF computes RMSNorm, RoPE tables and softmaxes in fp32 (``.float()`` / ``dtype=torch.float32``). For
bf16 and fp32 runs we do the same, so fp32 agrees with stock HF and bf16 rounds where HF rounds. For fp64
runs we compute in fp64 throughout (the HF reference removes its fp32 casts in that mode, facts §6.23).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for norm/RoPE/softmax math on activations of ``dtype``: fp32, or fp64 for fp64 runs."""
    return torch.promote_types(dtype, torch.float32)

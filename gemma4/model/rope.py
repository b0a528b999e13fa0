"""Dual RoPE exactly as HF computes it (``Gemma4TextRotaryEmbedding``, ``modeling_rope_utils``).

* ``default`` (sliding layers): ``inv_freq[j] = theta^(-2j/d)`` for j < d/2, every pair rotates.
* ``proportional`` (full layers): the first ``int(prf * d // 2)`` frequencies are ``theta^(-2j/d)`` with
  the *full* head dim ``d`` as denominator, the rest are 0 (position-free pairs), all divided by ``factor``.

Both rotate NeoX-style pairs ``(i, i + d/2)``: ``emb = cat(freqs, freqs)``, ``x*cos + rotate_half(x)*sin``.
In a full layer with d = 512 this rotates dims [0, 64) with [256, 320): not Megatron's ``rotary_percent``
(which would rotate (i, i+64) over the first 128 dims, facts §1.3).

The model passes one tensor of angles per token to every layer (sliding angles then full angles along the
last dim), so it survives Megatron's activation checkpointing; each layer slices its own part.
"""

from __future__ import annotations

import torch

from gemma4.config import FULL, SLIDING, Gemma4TextSpec, RopeSpec
from gemma4.model.numerics import compute_dtype


def inv_freq(rope: RopeSpec, head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` computed with HF's formula in ``dtype``."""
    if rope.rope_type == "default":
        n_rot = head_dim // 2
    elif rope.rope_type == "proportional":
        n_rot = int(rope.partial_rotary_factor * head_dim // 2)
    else:  # validated in gemma4.config
        raise ValueError(f"unsupported rope_type {rope.rope_type!r}")
    exponents = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).to(dtype) / head_dim
    rotated = 1.0 / (rope.theta**exponents)
    freqs = torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot, dtype=dtype)])
    if rope.rope_type == "proportional":
        freqs = freqs / rope.factor
    return freqs


def rope_angles(spec: Gemma4TextSpec, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Angles ``position * inv_freq`` for every layer type, ``[s, b, 1, sum(d_t / 2)]`` in compute dtype.

    ``position_ids`` is ``[b, s]``. Sliding-layer angles come first, then full-layer angles (see
    :func:`angles_for`).
    """
    cdt = compute_dtype(dtype)
    parts = []
    for layer_type in (SLIDING, FULL):
        if layer_type in spec.layer_types:
            f = inv_freq(spec.rope[layer_type], spec.head_dim_of(layer_type), cdt).to(position_ids.device)
            parts.append(position_ids.to(cdt)[..., None] * f)
    angles = torch.cat(parts, dim=-1)  # [b, s, n]
    return angles.transpose(0, 1).unsqueeze(2).contiguous()


def angles_for(spec: Gemma4TextSpec, angles: torch.Tensor, layer_type: str) -> torch.Tensor:
    """This layer type's slice of the packed angles from :func:`rope_angles`."""
    start = 0
    if layer_type == FULL and SLIDING in spec.layer_types:
        start = spec.head_dim_of(SLIDING) // 2
    width = spec.head_dim_of(layer_type) // 2
    return angles[..., start : start + width]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dim: NeoX / non-interleaved pairs ``(i, i + d/2)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``emb = cat(freqs, freqs)``; cos/sin in compute precision, then cast to the activation dtype."""
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in the activation dtype (HF ``apply_rotary_pos_emb``)."""
    return (x * cos) + (rotate_half(x) * sin)

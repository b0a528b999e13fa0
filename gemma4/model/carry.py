"""The per-forward carry: per-layer embeddings (PLE) and shared K/V travelling from layer to layer.

E2B/E4B layers need two things beyond the hidden state: their slice of the per-layer inputs (PLE, built
once from the token ids and the embedding), and, on KV-shared ("reuse") layers, the K/V of the last earlier
"store" layer of their type. Megatron's ``TransformerBlock`` threads exactly one extra tensor from layer to
layer, ``context`` (each layer returns the context the next one gets, also through activation
checkpointing, whose saved inputs must be tensors). The carry is that tensor: one flat 1-D buffer laid out
as ``[PLE | K_t | V_t for each reused layer type t]``. A store layer writes its K/V functionally (a new
tensor, so autograd connects the reuse layers to the store layer, recompute included); reuse layers read
views.

Layout (:func:`carry_layout`) depends only on shapes every layer can compute itself: the local sequence
(``s_tok`` tokens of hidden state on this rank, ``s_kv`` tokens of K/V and of PLE inputs: the whole local
sequence even under sequence parallelism), the batch, and the per-type local KV heads and head dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma4.config import LAYER_TYPES, Gemma4TextSpec


@dataclass(frozen=True)
class Slot:
    """A region of the carry: ``[offset, offset + numel)`` viewed as ``shape``."""

    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def read(self, carry: torch.Tensor) -> torch.Tensor:
        return carry[self.offset : self.offset + self.numel].view(self.shape)

    def write(self, carry: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A new carry with ``value`` in this slot (functional: keeps autograd through both)."""
        return torch.cat([carry[: self.offset], value.reshape(-1), carry[self.offset + self.numel :]])


@dataclass(frozen=True)
class CarryLayout:
    """Where the PLE inputs and each layer type's shared K/V live in the carry."""

    ple: Slot | None
    keys: dict[str, Slot]
    values: dict[str, Slot]
    numel: int


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads per TP rank (1 when they are replicated over ranks)."""
    return max(1, num_kv_heads // tp)


def carry_layout(spec: Gemma4TextSpec, s_tok: int, s_kv: int, batch: int, tp: int) -> CarryLayout:
    """The carry layout for ``s_tok`` hidden-state tokens and ``s_kv`` K/V tokens on this rank."""
    offset = 0
    ple = None
    if spec.ple_dim:  # full local sequence: the column-parallel PLE gate gathers SP-sharded tokens
        ple = Slot(0, (s_kv, batch, spec.num_layers, spec.ple_dim))
        offset = ple.numel
    keys, values = {}, {}
    reused = {spec.layer_types[i] for i in range(spec.num_layers) if spec.reuses_kv(i)}
    for t in LAYER_TYPES:
        if t in reused:
            shape = (s_kv, batch, local_kv_heads(spec.kv_heads_of(t), tp), spec.head_dim_of(t))
            keys[t] = Slot(offset, shape)
            offset += keys[t].numel
            values[t] = Slot(offset, shape)
            offset += values[t].numel
    return CarryLayout(ple, keys, values, offset)


def needs_carry(spec: Gemma4TextSpec) -> bool:
    """True when layers need more than the hidden state (PLE on, or some layer reuses K/V)."""
    return bool(spec.ple_dim) or any(spec.reuses_kv(i) for i in range(spec.num_layers))

"""How our side of a parity run is laid out: tensor/context/expert parallel sizes, sequence parallelism,
packed documents, recompute; and the refusals of layouts the model cannot run.

Import-light (no torch at module level): the CLI builds its help texts from the layout registry
(``harness/report/layouts.py``) without loading models; :func:`pad_weights` imports torch when called.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunLayout:
    """How our model is run: tensor/context parallel sizes, sequence parallelism, packed documents."""

    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    packed: tuple[int, ...] | None = None
    ep: int = 1
    recompute: bool = False  # full activation recompute, one layer per checkpoint

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.ep

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}" + ("+sp" if self.sequence_parallel else "")]
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.recompute:
            parts.append("recompute")
        if self.packed:
            parts.append("packed[" + ",".join(map(str, self.packed)) + "]")
        return "-".join(parts)


def validate_layout(spec: Gemma4TextSpec, layout: RunLayout, batch: int, seq_len: int) -> None:
    """Refuse layouts the model cannot run, naming the flag (exit 2 in the CLI)."""
    if layout.tp < 1 or layout.cp < 1 or layout.ep < 1:
        raise InvalidInputError(
            f"--tp, --cp and --ep must be >= 1 (got {layout.tp}, {layout.cp}, {layout.ep})"
        )
    if layout.world_size > 8:
        raise InvalidInputError(
            f"--tp x --cp x --ep = {layout.world_size} processes; at most 8 on a CPU machine"
        )
    if layout.ep > 1:
        if not spec.enable_moe:
            raise InvalidInputError(
                f"--ep {layout.ep}: the config has no experts to shard (enable_moe_block is false)"
            )
        if spec.num_experts % layout.ep:
            raise InvalidInputError(f"--ep {layout.ep} does not divide num_experts = {spec.num_experts}")
        if layout.packed or batch % layout.ep:
            raise InvalidInputError(
                f"--ep {layout.ep}: expert-parallel ranks are data-parallel replicas, so --batch ({batch}) must be "
                "a multiple of --ep (and --packed, a single row, cannot be split)"
            )
    if spec.enable_moe and layout.tp > 1 and not layout.sequence_parallel:
        raise InvalidInputError("--tp > 1 with MoE layers needs --sequence-parallel (as Megatron requires)")
    tp = layout.tp
    # Vocabulary and MLP widths are zero-padded to a multiple of TP (see tp_padding); heads cannot be.
    if spec.num_attention_heads % tp:
        raise InvalidInputError(f"--tp {tp} does not divide num_attention_heads = {spec.num_attention_heads}")
    if spec.ple_dim and spec.ple_dim % tp:
        raise InvalidInputError(f"--tp {tp} does not divide hidden_size_per_layer_input = {spec.ple_dim}")
    for i, nkv in enumerate(spec.num_kv_heads):
        if (nkv >= tp and nkv % tp) or (nkv < tp and tp % nkv):
            raise InvalidInputError(f"--tp {tp}: layer {i} has {nkv} KV heads; one must divide the other")
    if layout.sequence_parallel and tp == 1:
        raise InvalidInputError("--sequence-parallel needs --tp > 1")
    lengths = list(layout.packed) if layout.packed else [seq_len]
    if layout.packed and any(n < 2 for n in lengths):
        raise InvalidInputError(f"--packed: every document needs >= 2 tokens, got {lengths}")


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def tp_padding(spec: Gemma4TextSpec, tp: int) -> Gemma4TextSpec:
    """The spec our model is built with under TP: vocabularies and MLP widths rounded up to a multiple of TP
    (Megatron pads the vocabulary the same way). Padded rows/columns are zero, so the math is unchanged;
    padded vocabulary entries are cut from the logits before anything is compared or trained."""
    if tp == 1:
        return spec
    return dataclasses.replace(
        spec,
        vocab_size=_ceil_to(spec.vocab_size, tp),
        ple_vocab_size=_ceil_to(spec.ple_vocab_size, tp) if spec.ple_vocab_size else 0,
        intermediate_size=_ceil_to(spec.intermediate_size, tp),
        intermediate_sizes=tuple(_ceil_to(i, tp) for i in spec.intermediate_sizes),
        moe_intermediate_size=_ceil_to(spec.moe_intermediate_size, tp)
        if spec.moe_intermediate_size
        else None,
    )


def pad_weights(full: dict[str, torch.Tensor], tp: int) -> dict[str, torch.Tensor]:
    """Zero-pad TP = 1 Megatron tensors to the :func:`tp_padding` sizes (vocab rows, GLU halves, fc2 columns)."""
    if tp == 1:
        return full
    import torch

    out = {}
    for name, t in full.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight", "per_layer_embedding.weight"):
            t = torch.nn.functional.pad(t, (0, 0, 0, _ceil_to(t.shape[0], tp) - t.shape[0]))
        elif name.endswith("linear_fc1.weight"):  # [gate; up]: pad each half
            gate, up = t.chunk(2, dim=0)
            extra = _ceil_to(gate.shape[0], tp) - gate.shape[0]
            t = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, extra)) for h in (gate, up)])
        elif name.endswith("linear_fc2.weight"):
            t = torch.nn.functional.pad(t, (0, _ceil_to(t.shape[1], tp) - t.shape[1]))
        out[name] = t
    return out

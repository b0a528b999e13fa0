"""How our side of a parity run is laid out: tensor/context/expert parallel sizes, sequence parallelism,
packed documents, recompute; and the refusals of layouts the model cannot run.

Import-light (no torch): the CLI builds its help texts from the layout registry without loading models.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError


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

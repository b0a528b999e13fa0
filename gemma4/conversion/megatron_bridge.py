"""Megatron-Bridge 0.6.2's Megatron layout of Gemma 4 text models <-> ours.

Megatron-Bridge (NVIDIA-NeMo, PyPI ``megatron-bridge==0.6.2``, ``src/megatron/bridge/models/gemma/``)
builds Gemma 4 as a Megatron ``GPTModel`` too, but its state dict differs from ours
(:mod:`gemma4.conversion.mapping`) in five ways. The facts below were read from its 0.6.2 wheel
(``gemma4_bridge.py``, ``modeling_gemma4.py``, ``gemma4_provider.py``, ``conversion/param_mapping.py``) and
checked by running its own mapping code (see ``tests/unit/gemma4/conversion/test_megatron_bridge.py``):

1. **K=V full-attention layers** (31B, 26B-A4B, 12B): our ``linear_qkv`` has no V slot (``[q_g, k_g]`` per KV
   group); the Bridge's has one holding a **copy of K** (``Gemma4Bridge.maybe_modify_loaded_hf_weight``), which
   its attention never reads (V is the raw K; ``_get_k_eq_v_query_key_value_tensors``) and its HF export drops.
2. **KV-shared layers** (E2B, E4B): ours hold only the query rows and no ``k_layernorm``; the Bridge's hold a
   full ``[q_g, k_g, v_g]`` ``linear_qkv`` whose K and V slots are **zeros** (synthesised on import) and a
   ``k_layernorm`` left at its initial **ones** (no HF tensor maps to it). Neither is read at run time.
3. **MoE layers** (26B-A4B): the Bridge uses a Transformer-Engine layer (fused input norm in
   ``linear_qkv.layer_norm_weight``, post-attention norm in ``linear_proj.post_layernorm.weight``), treats the
   dense MLP as ``mlp.shared_experts`` and stores experts as TE grouped GEMM weights ``linear_fc1.weight{e}``;
   the norms are renamed (table :data:`MOE_RENAMES`).
4. **PLE**: ``per_layer_model_projection.weight`` / ``per_layer_projection_norm.weight`` (ours, = HF) are
   ``per_layer_model_proj.weight`` / ``per_layer_proj_norm.weight`` in the Bridge.
5. **Vocabulary padding**: the Bridge pads the word embedding to a multiple of 128 rows with zeros
   (``make_vocab_size_divisible_by = 128``, ``ColumnParallelMapping`` pads dim 0); ours is unpadded. Released
   Gemma 4 vocabularies (262144) need no padding.

Untied output layers are refused: the 0.6.2 Gemma 4 mapping registry has no ``output_layer`` entry.

**Dead slots.** The runtime-unused parts of a Bridge state dict (1, 2, 5) have a canonical value (a copy of K,
zeros, ones, zero rows). Converting ours -> Bridge writes exactly that; converting Bridge -> ours refuses a
state dict whose dead slots differ from it, naming the tensor and the difference, unless
``discard_unused=True``: then the slots are dropped (they do not affect the model; Megatron-Bridge's own HF
export drops them as well) and a note says what was dropped. Only canonical checkpoints round-trip bit-exactly
Bridge -> ours -> Bridge; every checkpoint round-trips ours -> Bridge -> ours.

All tensors here are TP = 1 global tensors (what ``GPTModel.state_dict()`` holds on one rank, ``_extra_state``
entries aside).

**Inputs.** A Bridge state dict as safetensors with our manifest (written here), one saved elsewhere (with
``--hf-config``), or a ``torch_dist`` directory Megatron-Bridge itself saved (dense models, with
``--hf-config``; key layout in the "checkpoint directories" section below). MoE ``torch_dist`` checkpoints are
refused: their Transformer-Engine layout could not be checked.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.config import Gemma4TextSpec
from gemma4.conversion import mapping
from gemma4.conversion.manifest import FORMAT, FORMAT_TORCH_DIST, MANIFEST, write_manifest
from gemma4.conversion.safetensors_io import (
    Entry,
    SafetensorsDir,
    ShardedWriter,
    read_checkpoint_json,
    read_tensor,
)
from gemma4.errors import InvalidInputError

#: Shard size of Megatron checkpoints (as :data:`gemma4.conversion.convert.MCORE_MAX_SHARD_BYTES`).
MCORE_MAX_SHARD_BYTES = 20 * 1024**3

#: The Megatron-Bridge release whose layout this module writes and reads.
BRIDGE_VERSION = "0.6.2"
#: Megatron-Bridge pads the word embedding to a multiple of this (``make_vocab_size_divisible_by``).
VOCAB_DIVISOR = 128

#: Our global tensor name -> the Bridge's (PLE, ``_dense_mapping_registry`` in ``gemma4_bridge.py``).
GLOBAL_RENAMES: dict[str, str] = {
    "per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}
#: Our MoE-layer tensor name (after ``decoder.layers.{L}.``) -> the Bridge's (``_moe_mapping_registry``).
MOE_RENAMES: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "post_self_attn_layernorm.weight": "self_attention.linear_proj.post_layernorm.weight",
    "mlp.pre_dense_layernorm.weight": "pre_shared_expert_layernorm.weight",
    "mlp.dense_mlp.linear_fc1.weight": "mlp.shared_experts.linear_fc1.weight",
    "mlp.dense_mlp.linear_fc2.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.post_dense_layernorm.weight": "mlp.post_shared_expert_layernorm.weight",
    "mlp.pre_experts_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.post_experts_layernorm.weight": "mlp.post_moe_layernorm.weight",
    "post_mlp_layernorm.weight": "post_ffn_layernorm.weight",
}
# Experts: ours ``mlp.experts.local_experts.{e}.linear_fc{1,2}.weight`` (SequentialMLP), the Bridge's
# ``mlp.experts.linear_fc{1,2}.weight{e}`` (TEGroupedMLP); same [2I, H] / [H, I] tensors at TP = 1.
_OUR_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

#: Names only one of the two layouts has: evidence for :func:`detect_layout`.
BRIDGE_MARKERS = (
    "per_layer_model_proj.weight",
    "per_layer_proj_norm.weight",
    ".mlp.shared_experts.",
    ".pre_shared_expert_layernorm.",
    ".post_ffn_layernorm.",
    ".linear_qkv.layer_norm_weight",
    ".linear_proj.post_layernorm.",
    ".mlp.post_moe_layernorm.",
)
OURS_MARKERS = (
    "per_layer_model_projection.weight",
    "per_layer_projection_norm.weight",
    ".mlp.dense_mlp.",
    ".mlp.local_experts.",
    ".mlp.experts.local_experts.",
    ".mlp.pre_dense_layernorm.",
    ".mlp.pre_experts_layernorm.",
)
_BRIDGE_EXPERT = re.compile(r"\.mlp\.experts\.linear_fc[12]\.weight\d+$")


# ---- names ----------------------------------------------------------------------------------------------


def padded_vocab(vocab_size: int, divisor: int = VOCAB_DIVISOR) -> int:
    """Rows of the Bridge's word embedding: ``vocab_size`` rounded up to a multiple of ``divisor``."""
    return -(-vocab_size // divisor) * divisor


def bridge_name(ours: str, spec: Gemma4TextSpec) -> str:
    """The Bridge's name of our (TP = 1, global expert index) Megatron tensor ``ours``."""
    if ours in GLOBAL_RENAMES:
        return GLOBAL_RENAMES[ours]
    m = _LAYER.match(ours)
    if m is None or not getattr(spec, "enable_moe", False):
        return ours
    layer, rest = m.groups()
    e = _OUR_EXPERT.fullmatch(rest)
    if e is not None:
        return f"decoder.layers.{layer}.mlp.experts.linear_fc{e.group(2)}.weight{e.group(1)}"
    return f"decoder.layers.{layer}.{MOE_RENAMES.get(rest, rest)}"


def _is_kv_eq(spec: Gemma4TextSpec, layer: int) -> bool:
    """K=V full-attention layer that owns its K (the Bridge adds a V slot = K)."""
    return not spec.reuses_kv(layer) and not spec.has_v_proj(layer)


def _qkv_name(layer: int) -> str:
    return f"decoder.layers.{layer}.self_attention.linear_qkv.weight"


def _k_norm_name(layer: int) -> str:
    return f"decoder.layers.{layer}.self_attention.k_layernorm.weight"


@dataclass(frozen=True)
class BridgeEntry:
    """One Bridge tensor: its name, shape, and our tensor it comes from (``None``: Bridge-only, dead)."""

    name: str
    shape: tuple[int, ...]
    ours: str | None


def _our_names_shapes(spec: Gemma4TextSpec) -> Iterator[tuple[str, tuple[int, ...], int | None]]:
    """Our TP = 1 tensors (name, shape, layer) in checkpoint order, from the mapping table on meta tensors."""
    for rule, layer in mapping.bound_rules(spec):
        metas = [torch.empty(mapping.hf_shape(n, spec, layer), device="meta") for n in rule.hf]
        w = mapping.rule_to_mcore(rule, metas, spec, layer)
        if rule.is_expert:
            for e, t in enumerate(w):
                yield rule.mcore.format(e=e), tuple(t.shape), layer
        else:
            yield rule.mcore, tuple(w.shape), layer


def check_supported(spec: Gemma4TextSpec) -> None:
    """Refuse configs Megatron-Bridge 0.6.2's Gemma 4 mapping cannot hold."""
    if not spec.tie_word_embeddings:
        raise InvalidInputError(
            f"tie_word_embeddings is false: Megatron-Bridge {BRIDGE_VERSION}'s Gemma 4 mapping has no "
            "output_layer/lm_head entry (gemma4_bridge.py), so an untied head has no place in its layout"
        )


def bridge_plan(spec: Gemma4TextSpec) -> list[BridgeEntry]:
    """Every tensor of the Bridge's TP = 1 state dict for ``spec``, in our checkpoint order (Bridge-only
    ``k_layernorm`` of KV-shared layers right after that layer's ``linear_qkv``)."""
    check_supported(spec)
    out: list[BridgeEntry] = []
    for name, shape, layer in _our_names_shapes(spec):
        if name == "embedding.word_embeddings.weight":
            shape = (padded_vocab(shape[0]),) + shape[1:]
        elif (
            layer is not None
            and name == _qkv_name(layer)
            and (spec.reuses_kv(layer) or _is_kv_eq(spec, layer))
        ):
            d, n_kv = spec.head_dims[layer], spec.num_kv_heads[layer]
            shape = ((spec.num_attention_heads + 2 * n_kv) * d, shape[1])
        out.append(BridgeEntry(bridge_name(name, spec), shape, name))
        if layer is not None and name == _qkv_name(layer) and spec.reuses_kv(layer):
            out.append(BridgeEntry(_k_norm_name(layer), (spec.head_dims[layer],), None))
    return out


# ---- ours -> Bridge -------------------------------------------------------------------------------------


def _insert_v_copy(w: torch.Tensor, num_heads: int, num_kv: int, d: int) -> torch.Tensor:
    """``[q_g, k_g]`` per group -> ``[q_g, k_g, k_g]`` (the Bridge's V slot holds a copy of K)."""
    q, k, _ = mapping.unpack_qkv(w, num_heads, num_kv, d, has_v=False)
    return mapping.pack_qkv(q, k, k.clone(), num_heads, num_kv, d)


def _insert_zero_kv(q: torch.Tensor, num_heads: int, num_kv: int, d: int) -> torch.Tensor:
    """Query rows of a KV-shared layer -> ``[q_g, 0, 0]`` per group (the Bridge's synthesised K/V)."""
    kv = torch.zeros(num_kv * d, q.shape[1], dtype=q.dtype)
    return mapping.pack_qkv(q, kv, kv.clone(), num_heads, num_kv, d)


def to_bridge(ours: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> dict[str, torch.Tensor]:
    """Our TP = 1 Megatron state dict -> Megatron-Bridge 0.6.2's (canonical dead slots, see module doc).

    ``ours`` must hold exactly our tensors for ``spec`` (``_extra_state`` entries are ignored); refusals name
    the tensor.
    """
    plan = bridge_plan(spec)
    given = {k: v for k, v in ours.items() if not k.endswith("_extra_state")}
    want = {e.ours for e in plan if e.ours is not None}
    _check_names(given, want, "our Megatron state dict", _bridge_hint)
    out: dict[str, torch.Tensor] = {}
    dtype = next(iter(given.values())).dtype if given else torch.float32
    for e in plan:
        if e.ours is None:  # k_layernorm of a KV-shared layer: the Bridge's initial ones
            out[e.name] = torch.ones(e.shape, dtype=dtype)
            continue
        w = given[e.ours]
        m = _LAYER.match(e.ours)
        layer = int(m.group(1)) if m else None
        if e.ours == "embedding.word_embeddings.weight" and e.shape[0] != w.shape[0]:
            pad = torch.zeros((e.shape[0] - w.shape[0],) + tuple(w.shape[1:]), dtype=w.dtype)
            w = torch.cat([w, pad], dim=0)
        elif layer is not None and e.ours == _qkv_name(layer):
            d, n_kv, n_h = spec.head_dims[layer], spec.num_kv_heads[layer], spec.num_attention_heads
            if spec.reuses_kv(layer):
                w = _insert_zero_kv(w, n_h, n_kv, d)
            elif _is_kv_eq(spec, layer):
                w = _insert_v_copy(w, n_h, n_kv, d)
        if tuple(w.shape) != e.shape:
            raise InvalidInputError(
                f"tensor {e.ours!r} has shape {list(w.shape)}; the config implies "
                f"{list(e.shape)} in Megatron-Bridge's layout ({e.name!r})"
            )
        out[e.name] = w
    return out


# ---- Bridge -> ours -------------------------------------------------------------------------------------


def _describe(diff: torch.Tensor) -> str:
    return f"max |difference| {diff.abs().max().item():.6g} over {int((diff != 0).sum())} elements"


def from_bridge(
    bridge: Mapping[str, torch.Tensor], spec: Gemma4TextSpec, *, discard_unused: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Megatron-Bridge 0.6.2's TP = 1 state dict -> ours, and notes.

    Every tensor of the Bridge layout for ``spec`` must be present (``_extra_state`` entries ignored) with its
    shape. Dead slots (module doc) must hold their canonical value, else :class:`InvalidInputError` names the
    tensor and the difference; with ``discard_unused`` they are dropped and a note says so.
    """
    plan = bridge_plan(spec)
    given = {k: v for k, v in bridge.items() if not k.endswith("_extra_state")}
    _check_names(given, {e.name for e in plan}, "Megatron-Bridge state dict", _ours_hint)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []

    def dead(name: str, what: str, diff: torch.Tensor) -> None:
        if not bool((diff != 0).any()):
            return
        if not discard_unused:
            raise InvalidInputError(
                f"tensor {name!r}: {what} ({_describe(diff)}); Megatron-Bridge {BRIDGE_VERSION} never reads it, "
                "but it cannot be kept in our layout, so the result would not convert back bit-exactly: "
                "pass --discard-unused (discard_unused=True) to drop it"
            )
        dropped.append(f"{name} ({what}: {_describe(diff)})")

    for e in plan:
        w = given[e.name]
        if tuple(w.shape) != e.shape:
            raise InvalidInputError(
                f"tensor {e.name!r} has shape {list(w.shape)}; the config implies {list(e.shape)} "
                f"in Megatron-Bridge {BRIDGE_VERSION}'s layout"
            )
        if e.ours is None:  # k_layernorm of a KV-shared layer (unused; canonical = ones)
            dead(e.name, "k_layernorm of a KV-shared layer is not its initial ones", w.float() - 1.0)
            continue
        m = _LAYER.match(e.ours)
        layer = int(m.group(1)) if m else None
        if e.ours == "embedding.word_embeddings.weight" and w.shape[0] != spec.vocab_size:
            dead(e.name, f"vocabulary padding rows {spec.vocab_size}.. are not zero", w[spec.vocab_size :])
            w = w[: spec.vocab_size]
        elif layer is not None and e.ours == _qkv_name(layer):
            d, n_kv, n_h = spec.head_dims[layer], spec.num_kv_heads[layer], spec.num_attention_heads
            if spec.reuses_kv(layer):
                q, k, v = mapping.unpack_qkv(w, n_h, n_kv, d, has_v=True)
                dead(e.name, f"K slot of KV-shared layer {layer} is not zero", k)
                dead(e.name, f"V slot of KV-shared layer {layer} is not zero", v)
                w = q
            elif _is_kv_eq(spec, layer):
                q, k, v = mapping.unpack_qkv(w, n_h, n_kv, d, has_v=True)
                assert v is not None
                dead(e.name, f"V slot of K=V layer {layer} differs from its K slot", v.float() - k.float())
                w = mapping.pack_qkv(q, k, None, n_h, n_kv, d)
        out[e.ours] = w.contiguous()
    notes = []
    if dropped:
        notes.append(
            f"--discard-unused: dropped {len(dropped)} runtime-unused Megatron-Bridge slots that differ from "
            f"their canonical value: {'; '.join(dropped[:8])}" + (" ..." if len(dropped) > 8 else "")
        )
    return out, notes


# ---- telling the layouts apart --------------------------------------------------------------------------


def detect_layout(
    names: Mapping[str, tuple[int, ...]] | list[str], spec: Gemma4TextSpec | None = None
) -> str | None:
    """``"megatron-bridge"``, ``"ours"`` or ``None`` (no evidence), from tensor names (and, given ``spec`` and
    shapes, from the ``linear_qkv`` rows of K=V and KV-shared layers, where dense names coincide)."""
    keys = list(names)
    if any(m in k for k in keys for m in BRIDGE_MARKERS) or any(_BRIDGE_EXPERT.search(k) for k in keys):
        return "megatron-bridge"
    if any(m in k for k in keys for m in OURS_MARKERS):
        return "ours"
    if spec is None or not isinstance(names, Mapping):
        return None
    for layer in range(spec.num_layers):
        if not (spec.reuses_kv(layer) or _is_kv_eq(spec, layer)):
            continue
        shape = names.get(_qkv_name(layer))
        if shape is None:
            continue
        d, n_kv = spec.head_dims[layer], spec.num_kv_heads[layer]
        if shape[0] == (spec.num_attention_heads + 2 * n_kv) * d:
            return "megatron-bridge"
        return "ours"
    if any(
        k.startswith("decoder.layers.") and k.endswith(".self_attention.k_layernorm.weight") for k in keys
    ):
        reuse = [L for L in range(spec.num_layers) if spec.reuses_kv(L)]
        if reuse and _k_norm_name(reuse[0]) in names:
            return "megatron-bridge"
    return None


def _bridge_hint(extra: list[str]) -> str:
    if detect_layout(extra) == "megatron-bridge":
        return (
            f" (this looks like a Megatron-Bridge {BRIDGE_VERSION} state dict, e.g. {extra[0]!r}: "
            "use --layout megatron-bridge)"
        )
    return ""


def _ours_hint(extra: list[str]) -> str:
    if detect_layout(extra) == "ours":
        return (
            f" (this looks like a checkpoint in our layout, e.g. {extra[0]!r}, not Megatron-Bridge's: "
            "drop --layout megatron-bridge; relayout: --to megatron-bridge)"
        )
    return ""


def _check_names(
    given: Mapping[str, torch.Tensor], want: set[str], what: str, hint: Callable[[list[str]], str]
) -> None:
    missing = sorted(set(want) - set(given))
    extra = sorted(set(given) - set(want))
    if missing or extra:
        raise InvalidInputError(
            f"{what} does not match the config: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}{hint(extra)}"
        )


def layout_mismatch_hint(
    names: Mapping[str, tuple[int, ...]], spec: Gemma4TextSpec | None, expected: str
) -> str:
    """A sentence for refusals: what layout ``names`` look like when it is not ``expected`` (else "")."""
    found = detect_layout(names, spec)
    if found is None or found == expected:
        return ""
    if found == "megatron-bridge":
        return (
            f"this looks like a Megatron-Bridge {BRIDGE_VERSION} layout checkpoint (its names or its K/V slots); "
            "use --layout megatron-bridge"
        )
    return (
        "this looks like a checkpoint in our layout, not Megatron-Bridge's; drop --layout megatron-bridge "
        "(relayout: --to megatron-bridge)"
    )


# ---- checkpoint directories -----------------------------------------------------------------------------
#
# A Megatron-Bridge layout checkpoint as this project writes it:
#
#     OUT/
#       gemma4_mcore.json     manifest: format "megatron-bridge-state-dict", the Bridge version, dtype, hf_config
#       model.safetensors     the TP = 1 GPTModel state dict in Megatron-Bridge's names (HF-style shards + index
#                             when large); ``_extra_state`` left out
#
# Loading it into a Megatron-Bridge model is ``model.load_state_dict(safetensors.torch.load_file(...),
# strict=False)`` (strict apart from ``_extra_state``).
#
# Megatron-Bridge's own ``torch_dist`` checkpoints (what its trainer writes: ``dist_checkpointing.save(
# model.sharded_state_dict(), dir)``) are read too (:func:`bridge_torch_dist_names`), not written. Their
# model keys, as Megatron-Bridge 0.6.2 saved them for a dense Gemma 4 (``.metadata`` + ``__0_0.distcp`` +
# ``metadata.json``; see ``tests/unit/gemma4/conversion/test_megatron_bridge_torch_dist.py``):
#
#   * global tensors under their state-dict names (``embedding.word_embeddings.weight`` padded,
#     ``decoder.final_layernorm.weight``, ...);
#   * per-layer tensors **stacked on a leading layer axis** (Megatron's homogeneous layout):
#     ``decoder.layers.input_layernorm.weight`` [L, H], ``decoder.layers.layer_scalar`` [L, 1], ...;
#   * attention split by layer type, because sliding and full layers differ in shape
#     (``Gemma4SelfAttention.sharded_state_dict`` in ``modeling_gemma4.py``):
#     ``decoder.layers.self_attention_sliding.*`` [number of sliding layers, ...] and
#     ``decoder.layers.self_attention_global.*`` [number of full layers, ...]; row ``i`` is the ``i``-th layer
#     of that type (its ``type_rank``);
#   * ``mlp.linear_fc1.weight`` stored as two chunks per layer (gate, up) of the global ``[gate; up]`` tensor;
#   * optimizer states (``optimizer.*``) and non-tensor entries (``_extra_state``, RNG) in training
#     checkpoints, which are ignored; ``common.pt`` (pickled) is never read, so ``--hf-config`` is required.
#
# For E2B/E4B (layers of different MLP widths) Megatron-Bridge saves one key per layer instead, attention still
# split: ``decoder.layers.{L}.self_attention_sliding.*`` (seen live; the tests pin a digest of its keys). MoE
# models (Transformer Engine layers, no CPU build) were not saved here, so their torch_dist is refused.
#
# The ``.metadata`` pickle goes through :class:`gemma4.conversion.torch_dist.TorchDistReader`'s allow-list.

BRIDGE_FORMAT = "megatron-bridge-state-dict"
BRIDGE_MANIFEST_VERSION = 1


def bridge_manifest(hf_config: Any, dtype: torch.dtype, source: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a Bridge-layout checkpoint."""
    return {
        "format": BRIDGE_FORMAT,
        "version": BRIDGE_MANIFEST_VERSION,
        "megatron_bridge_version": BRIDGE_VERSION,
        "tensor_model_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "dtype": str(dtype).removeprefix("torch."),
        "names": (
            f"Megatron-Bridge {BRIDGE_VERSION} Gemma 4 GPTModel.state_dict() at TP = 1 (no _extra_state): K=V "
            "layers with a V slot = K, KV-shared layers with zero K/V slots and a ones k_layernorm, embedding "
            f"padded to a multiple of {VOCAB_DIVISOR} rows"
        ),
        "hf_config": json.loads(hf_config.to_json_string(use_diff=False)),
        "source": source,
    }


def hf_relative_to_bridge(hf: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> dict[str, torch.Tensor]:
    """Relative HF tensors -> the Bridge's TP = 1 state dict (through our table)."""
    check_supported(spec)
    return to_bridge(mapping.hf_to_mcore(hf, spec), spec)


def write_bridge_dir(
    tmp: Path,
    tensors: Mapping[str, torch.Tensor],
    spec: Gemma4TextSpec,
    hf_config: Any,
    source: dict[str, Any],
) -> list[Entry]:
    """Write a Bridge-layout checkpoint (tensors in plan order + manifest) into the temporary directory."""
    dtype = tensors["embedding.word_embeddings.weight"].dtype
    entries = [Entry(e.name, dtype, e.shape) for e in bridge_plan(spec)]
    writer = ShardedWriter(tmp, entries, MCORE_MAX_SHARD_BYTES)
    for e in entries:
        writer.write(e.name, tensors[e.name])
    writer.finish()
    write_manifest(tmp, bridge_manifest(hf_config, dtype, source))
    return entries


def hf_to_bridge_dir(hf_dir: Path, out: Path) -> dict[str, Any]:
    """HF checkpoint directory -> a Megatron-Bridge layout checkpoint at ``out`` (whole model in memory)."""
    from gemma4.conversion.convert import atomic_output_dir, check_output_dir, hf_source_record
    from gemma4.conversion.hf_io import open_hf_checkpoint

    t0 = time.perf_counter()
    check_output_dir(out)
    src = open_hf_checkpoint(hf_dir)
    check_supported(src.spec)
    hf = {n: src.read(n) for n in src.tensors}
    tensors = hf_relative_to_bridge(hf, src.spec)
    source = hf_source_record(src, hf_dir)
    with atomic_output_dir(out) as tmp:
        write_bridge_dir(tmp, tensors, src.spec, src.hf_config, source)
    return {
        "out": str(out),
        "layout": "megatron-bridge",
        "format": "safetensors",
        "tp": 1,
        "ep": 1,
        "dtype": str(src.dtype).removeprefix("torch."),
        "hf_tensors": len(src.tensors),
        "bridge_tensors": len(tensors),
        "notes": src.notes,
        "seconds": time.perf_counter() - t0,
    }


@dataclass
class BridgeSource:
    """A validated Bridge-layout checkpoint, converted to our TP = 1 tensors in memory.

    Has what :func:`gemma4.conversion.convert.export_hf_from_source` reads (``spec``, ``dtype``, ``tp``,
    ``ep``, ``hf_config``, ``notes``, ``read``)."""

    directory: Path
    hf_config: Any
    spec: Gemma4TextSpec
    dtype: torch.dtype
    ours: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    tp: int = 1
    ep: int = 1

    def read(self, rank: tuple[int, int], name: str) -> torch.Tensor:
        """Our tensor ``name`` (only rank (0, 0) exists)."""
        return self.ours[name]


def _bridge_config(directory: Path, hf_config_path: Path | None) -> tuple[Any, list[str]]:
    """The HF text config of a Bridge-layout directory: its manifest's, or ``--hf-config`` without one."""
    from gemma4.conversion.mcore_io import (
        _manifest_hf_config,
        _spec,
        check_hf_config_flag,
        read_hf_config_flag,
    )

    path = directory / MANIFEST
    if os.path.lexists(path):
        manifest = read_checkpoint_json(path, "manifest")
        fmt = manifest.get("format")
        if fmt in (FORMAT, FORMAT_TORCH_DIST):
            raise InvalidInputError(
                f"{path}: field 'format' is {fmt!r}: this is a checkpoint in our layout, not Megatron-Bridge's; "
                "drop --layout megatron-bridge (relayout: --to megatron-bridge)"
            )
        if fmt != BRIDGE_FORMAT:
            raise InvalidInputError(f"{path}: field 'format' must be {BRIDGE_FORMAT!r}, got {fmt!r}")
        if manifest.get("version") != BRIDGE_MANIFEST_VERSION:
            raise InvalidInputError(
                f"{path}: field 'version' is {manifest.get('version')!r}; this reader knows {BRIDGE_MANIFEST_VERSION}"
            )
        if manifest.get("megatron_bridge_version") != BRIDGE_VERSION:
            raise InvalidInputError(
                f"{path}: field 'megatron_bridge_version' is {manifest.get('megatron_bridge_version')!r}; this "
                f"reader knows the layout of {BRIDGE_VERSION}"
            )
        hf_config = _manifest_hf_config(manifest, path)
        return hf_config, check_hf_config_flag(hf_config_path, _spec(hf_config, str(path)), path)
    if hf_config_path is None:
        raise InvalidInputError(
            f"{directory}: no {MANIFEST}; for a Megatron-Bridge state dict saved elsewhere pass --hf-config "
            "with the model's config.json"
        )
    return read_hf_config_flag(hf_config_path), [f"config from --hf-config {hf_config_path}"]


#: A file at the root of a Megatron training checkpoint (its ``iter_NNNNNNN`` directories hold the weights).
TRAINING_ROOT_MARKER = "latest_checkpointed_iteration.txt"
#: Megatron-Bridge's torch_dist attention keys: ``decoder.layers.{prefix}*`` -> (sliding layers?, our prefix).
TORCH_DIST_ATTENTION = {"self_attention_sliding.": True, "self_attention_global.": False}
_STACKED = "decoder.layers."


@dataclass(frozen=True)
class _Stored:
    """One Bridge state-dict tensor as stored: shape, dtype, where (for messages), and how to read it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    path: Any
    read: Callable[[], torch.Tensor]


_TD_ATTENTION_KEY = re.compile(r"^decoder\.layers\.(\d+\.)?self_attention_(sliding|global)\.")


def is_bridge_torch_dist_keys(keys: list[str] | Mapping[str, Any]) -> bool:
    """True if torch_dist keys are Megatron-Bridge's Gemma 4 ones (attention split by layer type, layer-stacked
    or per layer)."""
    return any(_TD_ATTENTION_KEY.match(k) for k in keys)


def bridge_torch_dist_names(
    shapes: Mapping[str, tuple[int, ...]], spec: Gemma4TextSpec, where: str = "torch_dist checkpoint"
) -> dict[str, tuple[str, int | None]]:
    """Megatron-Bridge torch_dist keys (with their global shapes) -> ``{Bridge state-dict name: (key, row)}``:
    a layer-stacked key ``decoder.layers.X`` gives ``decoder.layers.{L}.X`` = row ``i`` for the ``i``-th layer
    (``self_attention_sliding.``/``self_attention_global.``: the ``i``-th layer of that type, renamed
    ``self_attention.``); a per-layer key ``decoder.layers.{L}.self_attention_{sliding,global}.X`` (what
    Megatron-Bridge saves for E2B/E4B, whose layers differ in shape) is ``decoder.layers.{L}.self_attention.X``;
    other keys keep their name (row ``None``). ``optimizer.*`` keys are skipped. A stacked key whose leading
    axis is not the number of such layers is refused, naming ``where``."""
    out: dict[str, tuple[str, int | None]] = {}

    def put(name: str, key: str, row: int | None) -> None:
        if name in out:
            raise InvalidInputError(f"{where}: keys {out[name][0]!r} and {key!r} both hold {name!r}")
        out[name] = (key, row)

    for key, shape in shapes.items():
        if key.startswith("optimizer.") or key.endswith("_extra_state"):
            continue
        rest = key[len(_STACKED) :] if key.startswith(_STACKED) else None
        if rest is None or rest.split(".", 1)[0].isdigit():  # global, or one key per layer (E-series)
            layer, _, tail = (rest or "").partition(".")
            for prefix, sliding in TORCH_DIST_ATTENTION.items():
                if rest is not None and tail.startswith(prefix):
                    if int(layer) >= spec.num_layers or spec.is_sliding(int(layer)) != sliding:
                        raise InvalidInputError(
                            f"{where}: key {key!r} says layer {layer} is "
                            f"{'sliding' if sliding else 'full'} attention; the config disagrees"
                        )
                    put(f"{_STACKED}{layer}.self_attention.{tail[len(prefix) :]}", key, None)
                    break
            else:
                put(key, key, None)
            continue
        layers = list(range(spec.num_layers))
        for prefix, sliding in TORCH_DIST_ATTENTION.items():
            if rest.startswith(prefix):
                layers = [L for L in layers if spec.is_sliding(L) == sliding]
                rest = "self_attention." + rest[len(prefix) :]
                break
        if not shape or shape[0] != len(layers):
            raise InvalidInputError(
                f"{where}: tensor {key!r} has shape {list(shape)}; a layer-stacked key needs a leading axis of "
                f"{len(layers)} (the config's layers of that kind)"
            )
        for i, L in enumerate(layers):
            put(f"decoder.layers.{L}.{rest}", key, i)
    return out


def _read_row(reader: Any, key: str, row: int) -> torch.Tensor:
    """Row ``row`` of layer-stacked torch_dist tensor ``key``, reading only the chunks that hold it (which must
    cover it exactly)."""
    import dataclasses
    import math

    md = reader.tensors[key]
    chunks = [c for c in md.chunks if c.offsets and c.offsets[0] <= row < c.offsets[0] + c.sizes[0]]
    covered = sum(math.prod(c.sizes[1:]) for c in chunks)
    if covered != math.prod(md.size[1:]):
        raise InvalidInputError(
            f"{reader.directory}: the stored chunks of {key!r} cover {covered} of the "
            f"{math.prod(md.size[1:])} elements of its row {row}"
        )
    if all(c.sizes[0] == 1 for c in chunks):  # Megatron's stacking: one row per chunk; read a [1, ...] tensor
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        shifted = [ChunkStorageMetadata(torch.Size((0, *c.offsets[1:])), c.sizes) for c in chunks]
        storage = {
            MetadataIndex(key, t.offsets): reader.storage.get(MetadataIndex(key, c.offsets))
            for c, t in zip(chunks, shifted)
        }
        md = dataclasses.replace(md, size=torch.Size((1, *md.size[1:])), chunks=shifted)
        return type(reader)(reader.directory, {key: md}, storage).read(key)[0].clone()
    sub = type(reader)(reader.directory, {key: dataclasses.replace(md, chunks=chunks)}, reader.storage)
    return sub.read(key)[row].clone()


def _torch_dist_items(directory: Path, spec: Gemma4TextSpec) -> dict[str, _Stored]:
    """The Bridge state-dict tensors of a Megatron-Bridge torch_dist directory (metadata through the
    allow-list; nothing read yet). A torch_dist directory whose keys are not Megatron-Bridge's is refused."""
    from gemma4.conversion.torch_dist import METADATA, TorchDistReader

    reader = TorchDistReader.open(directory)
    if not is_bridge_torch_dist_keys(reader.tensors):
        raise InvalidInputError(
            f"{directory}: a torch_dist checkpoint without Megatron-Bridge {BRIDGE_VERSION}'s Gemma 4 keys "
            f"(no 'decoder.layers.self_attention_sliding.*' / 'self_attention_global.*' in {METADATA}); if it "
            "is in our layout, drop --layout megatron-bridge (relayout: --to megatron-bridge)"
        )
    names = bridge_torch_dist_names(
        {k: reader.shape(k) for k in reader.tensors}, spec, f"{directory / METADATA}"
    )

    def item(key: str, row: int | None) -> _Stored:
        shape = reader.shape(key) if row is None else reader.shape(key)[1:]
        where = f"{directory} (torch_dist key {key!r}" + ("" if row is None else f", row {row}") + ")"

        def read() -> torch.Tensor:
            return reader.read(key) if row is None else _read_row(reader, key, row)

        return _Stored(shape, reader.dtype(key), where, read)

    return {name: item(key, row) for name, (key, row) in names.items()}


def open_bridge_checkpoint(
    directory: Path, hf_config_path: Path | None = None, *, discard_unused: bool = False
) -> BridgeSource:
    """Open, validate and convert a Bridge-layout checkpoint directory (names, shapes, one float dtype, dead
    slots; refusals name the file and tensor)."""
    from gemma4.conversion.mcore_io import _spec
    from gemma4.conversion.torch_dist import is_torch_dist

    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"{directory}: Megatron-Bridge checkpoint directory not found")
    torch_dist = is_torch_dist(directory)
    if not torch_dist and os.path.lexists(directory / TRAINING_ROOT_MARKER):
        raise InvalidInputError(
            f"{directory}: a Megatron training checkpoint root ({TRAINING_ROOT_MARKER}); pass one of its "
            "iter_NNNNNNN directories"
        )
    if torch_dist and hf_config_path is None and not os.path.lexists(directory / MANIFEST):
        raise InvalidInputError(
            f"{directory}: a torch_dist checkpoint (Megatron dist_checkpointing) without {MANIFEST}; its model "
            "config is only in pickled files this reader does not open: pass --hf-config with the model's "
            "config.json"
        )
    hf_config, notes = _bridge_config(directory, hf_config_path)
    spec = _spec(hf_config, str(directory))
    check_supported(spec)
    if torch_dist:
        if getattr(spec, "enable_moe", False):
            raise InvalidInputError(
                f"{directory}: a torch_dist checkpoint of a MoE model; Megatron-Bridge torch_dist checkpoints are "
                f"read for dense Gemma 4 only (its MoE layers are Transformer Engine modules, whose saved layout "
                "was not checked here): export it with Megatron-Bridge to HF (AutoBridge.export_ckpt or "
                "save_hf_pretrained), or save its model.state_dict() as safetensors and pass --layout "
                "megatron-bridge --hf-config"
            )
        infos = _torch_dist_items(directory, spec)
    else:
        store = SafetensorsDir(directory, "Megatron-Bridge checkpoint")
        infos = {
            k: _Stored(v.shape, v.dtype, v.path, functools.partial(read_tensor, v))
            for k, v in store.tensors.items()
            if not k.endswith("_extra_state")
        }
    want = {e.name: e for e in bridge_plan(spec)}
    missing = sorted(set(want) - set(infos))
    extra = sorted(set(infos) - set(want))
    if missing or extra:
        hint = layout_mismatch_hint({k: v.shape for k, v in infos.items()}, spec, "megatron-bridge")
        raise InvalidInputError(
            f"{directory}: the tensors do not match Megatron-Bridge {BRIDGE_VERSION}'s layout for this config: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
            f"{extra[:6]}{' ...' if len(extra) > 6 else ''}" + (f"; {hint}" if hint else "")
        )
    for name, e in want.items():
        info = infos[name]
        if tuple(info.shape) != e.shape:
            hint = layout_mismatch_hint({k: v.shape for k, v in infos.items()}, spec, "megatron-bridge")
            raise InvalidInputError(
                f"{info.path}: tensor {name!r} has shape {list(info.shape)}; Megatron-Bridge {BRIDGE_VERSION}'s "
                f"layout for this config has {list(e.shape)}" + (f"; {hint}" if hint else "")
            )
        if not info.dtype.is_floating_point:
            raise InvalidInputError(f"{info.path}: tensor {name!r} has dtype {info.dtype}, not a float dtype")
    # Megatron-Bridge keeps some tensors in fp32 in a bf16 model (its final norm, layer_scalar and PLE gate /
    # projection, seen in its own model built on CPU); ours has one dtype, the word embedding's. A tensor is
    # cast to it only when no value changes.
    dtype = infos["embedding.word_embeddings.weight"].dtype
    bridge: dict[str, torch.Tensor] = {}
    cast = []
    for name in want:
        t = infos[name].read()
        if t.dtype != dtype:
            c = t.to(dtype)
            if not torch.equal(c.to(t.dtype), t):
                raise InvalidInputError(
                    f"{infos[name].path}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')} with values "
                    f"that {str(dtype).removeprefix('torch.')} (the word embedding's dtype, which our layout uses "
                    "for every tensor) cannot hold exactly"
                )
            cast.append(name)
            t = c
        bridge[name] = t
    try:
        ours, more = from_bridge(bridge, spec, discard_unused=discard_unused)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{directory}: {exc}") from None
    what = (
        "torch_dist checkpoint (attention keys under self_attention_sliding/global)"
        if torch_dist
        else "layout checkpoint"
    )
    notes = [f"Megatron-Bridge {BRIDGE_VERSION} {what} {directory}"] + notes + more
    if cast:
        notes.append(
            f"{len(cast)} tensors stored in another dtype were cast to {str(dtype).removeprefix('torch.')} "
            f"without changing a value (e.g. {cast[0]!r})"
        )
    return BridgeSource(directory, hf_config, spec, dtype, ours, notes)


def bridge_to_hf_dir(
    bridge_dir: Path,
    out: Path,
    hf_config: Path | None = None,
    target: str = "hf",
    *,
    discard_unused: bool = False,
) -> dict[str, Any]:
    """A Bridge-layout checkpoint -> HF directory (the same export as ``mcore-to-hf``)."""
    from gemma4.conversion.convert import check_output_dir, export_hf_from_source

    t0 = time.perf_counter()
    check_output_dir(out)
    src = open_bridge_checkpoint(bridge_dir, hf_config, discard_unused=discard_unused)
    report = export_hf_from_source(src, out, target=target, t0=t0)
    report["layout"] = "megatron-bridge"
    return report


def _ours_as_hf(src: Any) -> dict[str, torch.Tensor]:
    """Every relative HF tensor of an opened checkpoint in our layout (any TP/EP), in memory."""
    from gemma4.conversion.mcore_io import gather_rule

    out: dict[str, torch.Tensor] = {}
    for rule, layer in mapping.bound_rules(src.spec):
        for name, t in gather_rule(rule, layer, src.read, src.spec, src.tp, src.ep):
            out[name] = t
    return out


def relayout_dir(
    mcore_dir: Path,
    out: Path,
    to: str,
    hf_config: Path | None = None,
    tp: int = 1,
    ep: int = 1,
    *,
    discard_unused: bool = False,
) -> dict[str, Any]:
    """Our Megatron checkpoint -> Megatron-Bridge layout (``to="megatron-bridge"``), or back (``to="ours"``,
    written for ``tp``/``ep``). Whole model in memory; output through a temporary directory."""
    from gemma4.conversion import sharding
    from gemma4.conversion.convert import atomic_output_dir, check_output_dir, software_versions
    from gemma4.conversion.mcore_io import (
        manifest_dict,
        open_mcore_checkpoint,
        plan,
        rank_dir_name,
        split_rule,
    )

    t0 = time.perf_counter()
    if to not in LAYOUTS:
        raise InvalidInputError(f"--to must be one of {list(LAYOUTS)}, got {to!r}")
    check_output_dir(out)
    source = {"mcore_dir": str(Path(mcore_dir).resolve()), "versions": software_versions()}
    if to == "megatron-bridge":
        if discard_unused:
            raise InvalidInputError("--discard-unused applies to Megatron-Bridge input (--to ours) only")
        if tp != 1 or ep != 1:
            raise InvalidInputError(
                "--tp/--ep: a Megatron-Bridge layout checkpoint is written at TP = 1, EP = 1"
            )
        try:
            src = open_mcore_checkpoint(mcore_dir, hf_config)
        except InvalidInputError as exc:
            hint = sniff_bridge_hint(Path(mcore_dir), hf_config)
            if hint:
                raise InvalidInputError(f"{exc}; {hint} (it is already in that layout)") from exc
            raise
        check_supported(src.spec)
        tensors = hf_relative_to_bridge(_ours_as_hf(src), src.spec)
        with atomic_output_dir(out) as tmp:
            write_bridge_dir(tmp, tensors, src.spec, src.hf_config, source)
        n, notes = len(tensors), list(src.notes)
    else:
        bsrc = open_bridge_checkpoint(mcore_dir, hf_config, discard_unused=discard_unused)
        spec = bsrc.spec
        sharding.check_tp(spec, tp)
        sharding.check_ep(spec, ep)
        hf = mapping.mcore_to_hf(bsrc.ours, spec)
        layout = plan(spec, bsrc.dtype, tp, ep)
        with atomic_output_dir(out) as tmp:
            writers = {
                rank: ShardedWriter(tmp / rank_dir_name(*rank, ep), entries, MCORE_MAX_SHARD_BYTES)
                for rank, entries in layout.items()
            }
            for rule, layer in mapping.bound_rules(spec):
                for rank, items in split_rule(rule, layer, [hf[n] for n in rule.hf], spec, tp, ep).items():
                    for name, t in items:
                        writers[rank].write(name, t)
            for w in writers.values():
                w.finish()
            write_manifest(tmp, manifest_dict(bsrc.hf_config, bsrc.dtype, tp, ep, source))
        n, notes = sum(len(v) for v in layout.values()), list(bsrc.notes)
    return {
        "out": str(out),
        "layout": to,
        "tp": tp,
        "ep": ep,
        "tensors": n,
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }


def bridge_roundtrip(hf_dir: Path, workdir: Path | None = None) -> dict[str, Any]:
    """HF -> Megatron-Bridge layout -> HF in a scratch directory; report whether the result is bit-exact."""
    from gemma4 import atomic_io
    from gemma4.conversion.convert import compare_hf
    from gemma4.conversion.hf_io import open_hf_checkpoint

    t0 = time.perf_counter()
    src = open_hf_checkpoint(hf_dir)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with atomic_io.temp_dir("gemma4-bridge-roundtrip-", workdir) as scratch:
        mc, back = Path(scratch) / "bridge", Path(scratch) / "hf"
        to_bridge_report = hf_to_bridge_dir(hf_dir, mc)
        to_hf = bridge_to_hf_dir(mc, back)
        exported = open_hf_checkpoint(back)
        diffs = compare_hf(src, exported)
    return {
        "identical": not diffs,
        "differences": diffs,
        "layout": "megatron-bridge",
        "format": "safetensors",
        "tensors": len(src.tensors),
        "tp": 1,
        "ep": 1,
        "dtype": str(src.dtype).removeprefix("torch."),
        "notes": list(src.notes),
        "seconds": {
            "hf_to_mcore": to_bridge_report["seconds"],
            "mcore_to_hf": to_hf["seconds"],
            "total": time.perf_counter() - t0,
        },
    }


def sniff_bridge_hint(directory: Path, hf_config_path: Path | None = None) -> str:
    """For refusals of our reader: a hint when ``directory`` holds a Megatron-Bridge layout checkpoint (its
    manifest's format, or its tensor names / K-V slot shapes under its manifest's config or ``hf_config_path``),
    else ``""``. Never raises."""
    from gemma4.conversion.mcore_io import _manifest_hf_config, _spec, read_hf_config_flag

    try:
        from gemma4.conversion.torch_dist import TorchDistReader, is_torch_dist

        if is_torch_dist(Path(directory)):
            keys = TorchDistReader.open(Path(directory)).tensors
            if is_bridge_torch_dist_keys(keys):
                return (
                    f"{directory} is a Megatron-Bridge {BRIDGE_VERSION} torch_dist checkpoint (keys "
                    "'decoder.layers.self_attention_sliding.*'/'self_attention_global.*'); use --layout "
                    "megatron-bridge with --hf-config"
                )
        path = Path(directory) / MANIFEST
        spec = None
        if os.path.lexists(path):
            manifest = read_checkpoint_json(path, "manifest")
            if manifest.get("format") == BRIDGE_FORMAT:
                return (
                    f"{path} says format {BRIDGE_FORMAT!r}: this is a Megatron-Bridge {BRIDGE_VERSION} layout "
                    "checkpoint; use --layout megatron-bridge"
                )
            try:
                spec = _spec(_manifest_hf_config(manifest, path), str(path))
            except InvalidInputError:
                spec = None
        elif hf_config_path is not None:
            try:
                spec = _spec(read_hf_config_flag(hf_config_path), str(hf_config_path))
            except InvalidInputError:
                spec = None
        shapes: dict[str, tuple[int, ...]] = {}
        for d in [Path(directory), *sorted(Path(directory).glob("mp_rank_*"))]:
            if d.is_dir() and any(d.glob("*.safetensors")):
                shapes.update({k: v.shape for k, v in SafetensorsDir(d).tensors.items()})
        return layout_mismatch_hint(shapes, spec, "ours")
    except (InvalidInputError, OSError):
        return ""


LAYOUTS = ("ours", "megatron-bridge")

"""Reading and writing HF Gemma 4 checkpoint directories (config.json + safetensors, single or sharded).

Text weights are addressed by names relative to the text-model prefix: ``model.`` (``Gemma4ForCausalLM``)
or ``model.language_model.`` (``Gemma4ForConditionalGeneration``); ``lm_head.weight`` stays absolute.
Vision/audio towers are skipped and reported. Only safetensors are read (no pickle), one tensor at a time.

:func:`open_hf_checkpoint` validates a directory against its ``config.json`` before anything is converted:
missing / unexpected tensors, shapes, one floating dtype for all text tensors, a tied ``lm_head`` that
differs from the embedding, each refused with the file and tensor named. Tolerated with a note: vision and
audio towers, a saved tied ``lm_head`` equal to the embedding, a synthesised ``v_proj`` equal to ``k_proj``
on a K=V layer, and the dead ``k_proj``/``v_proj``/``k_norm`` of KV-shared layers (E2B/E4B releases).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.config import CONFIG_FILE, Gemma4TextSpec, prefix_from_names, read_hf_config, text_spec_from_hf
from gemma4.conversion import mapping
from gemma4.conversion.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsDir,
    TensorInfo,
    read_tensor,
    same_bytes,
)
from gemma4.errors import ConfigError, InvalidInputError

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "NON_TEXT_PREFIXES",
    "HFCheckpoint",
    "HFSource",
    "detect_prefix",
    "drop_dead_kv_shared_weights",
    "open_hf_checkpoint",
    "read_hf_checkpoint",
    "safetensors_files",
    "write_hf_config",
    "EXPORT_TARGETS",
]

NON_TEXT_PREFIXES = (
    "model.vision_tower.",
    "model.embed_vision.",
    "model.audio_tower.",
    "model.embed_audio.",
    # the 12B (gemma4_unified): its vision embedder as stored on the hub (transformers renames it to
    # embed_vision.* when loading; SGLang's unified loader reads it under this name); not text weights
    "model.vision_embedder.",
)
HEAD = "lm_head.weight"
DEAD_KV_SUFFIXES = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")


#: The prefix rule from tensor names (:func:`gemma4.config.prefix_from_names`), under its historical name.
detect_prefix = prefix_from_names


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (headers validated), from the index when there is one."""
    return SafetensorsDir(Path(directory)).files


def drop_dead_kv_shared_weights(
    names: Iterable[str], num_hidden_layers: int, num_kv_shared_layers: int
) -> tuple[list[str], list[str], list[str]]:
    """Split relative HF names into (kept, dropped, notes) for KV-shared configs.

    Layers ``>= num_hidden_layers - num_kv_shared_layers`` reuse another layer's K/V and own no
    ``k_proj``/``v_proj``/``k_norm`` (facts §1.6); the released E2B/E4B checkpoints still carry them (facts
    §3.1). HF ignores them on load, and so do we: they are dropped with a note.
    """
    names = list(names)
    if num_kv_shared_layers <= 0:
        return names, [], []
    first_shared = num_hidden_layers - num_kv_shared_layers
    kept, dropped = [], []
    for n in names:
        parts = n.split(".")
        if (
            len(parts) > 2
            and parts[0] == "layers"
            and parts[1].isdigit()
            and int(parts[1]) >= first_shared
            and ".".join(parts[2:]) in DEAD_KV_SUFFIXES
        ):
            dropped.append(n)
        else:
            kept.append(n)
    notes = []
    if dropped:
        notes.append(
            f"dropped {len(dropped)} unused k_proj/v_proj/k_norm tensors of KV-shared layers "
            f"{first_shared}..{num_hidden_layers - 1} (HF ignores them too)"
        )
    return kept, dropped, notes


@dataclass
class HFSource:
    """A validated HF checkpoint: config, spec, and where each text tensor (relative name) is stored."""

    directory: Path
    raw_config: dict[str, Any]
    hf_config: Any
    spec: Gemma4TextSpec
    prefix: str
    store: SafetensorsDir
    tensors: dict[str, TensorInfo]
    dtype: torch.dtype
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def full_name(self, name: str) -> str:
        """The name as stored in the checkpoint."""
        return name if name == HEAD else self.prefix + name

    def read(self, name: str) -> torch.Tensor:
        """Read text tensor ``name`` (relative)."""
        return read_tensor(self.tensors[name])


def _classify(store: SafetensorsDir) -> tuple[str, dict[str, TensorInfo], list[str]]:
    prefix = prefix_from_names(store.tensors)
    text: dict[str, TensorInfo] = {}
    skipped: list[str] = []
    for name, info in store.tensors.items():
        if name.startswith(NON_TEXT_PREFIXES):
            skipped.append(name)
        elif name == HEAD:
            text[name] = info
        elif name.startswith(prefix):
            text[name[len(prefix) :]] = info
        else:
            raise InvalidInputError(f"{info.path}: unexpected tensor {name!r} (expected prefix {prefix!r})")
    return prefix, text, skipped


def open_hf_checkpoint(directory: Path) -> HFSource:
    """Open and validate an HF checkpoint directory against its ``config.json`` (nothing is loaded yet)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"{directory}: checkpoint directory not found")
    config = read_hf_config(directory / CONFIG_FILE)  # once, strictly (regular file, no NaN, bounded nesting)
    raw, hf_config = config.raw, config.hf_text_config()
    try:
        spec = text_spec_from_hf(hf_config)
    except ConfigError as exc:
        raise ConfigError(f"{directory / 'config.json'}: {exc}") from exc
    store = SafetensorsDir(directory, "checkpoint")
    prefix, text, skipped = _classify(store)
    notes = [f"weights from {directory} (prefix {prefix!r})"]
    if skipped:
        notes.append(f"skipped {len(skipped)} non-text tensors (vision/audio towers)")

    kv_shared = int(config.text.get("num_kv_shared_layers") or 0)
    kept, dropped, dead_notes = drop_dead_kv_shared_weights(list(text), spec.num_layers, kv_shared)
    for n in dropped:
        text.pop(n)
    notes += dead_notes

    def where(name: str) -> str:
        info = text[name]
        return f"{info.path}: tensor {(name if name == HEAD else prefix + name)!r}"

    embed = "embed_tokens.weight"
    if spec.tie_word_embeddings and HEAD in text:
        if embed in text and not same_bytes(text[HEAD], text[embed]):
            raise InvalidInputError(
                f"{where(HEAD)} differs from {prefix + embed!r}, but config.json sets tie_word_embeddings=true"
            )
        text.pop(HEAD)
        notes.append("dropped the saved lm_head.weight: identical to the tied embedding")
    for layer in range(spec.num_layers):
        v, k = f"layers.{layer}.self_attn.v_proj.weight", f"layers.{layer}.self_attn.k_proj.weight"
        if not spec.has_v_proj(layer) and v in text:
            if k in text and same_bytes(text[v], text[k]):
                text.pop(v)
                notes.append(f"dropped the synthesised v_proj of K=V layer {layer} (a copy of k_proj)")
            else:
                raise InvalidInputError(
                    f"{where(v)} is unexpected: layer {layer} is a K=V full-attention layer, which has no v_proj"
                )

    expected = mapping.expected_hf_names(spec)
    missing = [n for n in expected if n not in text]
    if missing:
        full = missing[0] if missing[0] == HEAD else prefix + missing[0]
        raise InvalidInputError(
            f"{directory}: tensor {full!r} is missing ({len(missing)} missing in total; config.json declares "
            f"{spec.num_layers} layers)"
        )
    unexpected = sorted(set(text) - set(expected))
    if unexpected:
        raise InvalidInputError(
            f"{where(unexpected[0])} is unexpected for a Gemma 4 text model with this config.json"
        )
    for rule, layer in mapping.bound_rules(spec):
        for name in rule.hf:
            want = mapping.hf_shape(name, spec, layer)
            if text[name].shape != want:
                raise InvalidInputError(
                    f"{where(name)} has shape {list(text[name].shape)}; config.json implies {list(want)}"
                )
    dtype = text[embed].dtype
    if not dtype.is_floating_point:
        raise InvalidInputError(f"{where(embed)} has dtype {dtype}; weights must be floating point")
    for name in expected:
        if text[name].dtype != dtype:
            raise InvalidInputError(
                f"{where(name)} has dtype {str(text[name].dtype).removeprefix('torch.')}; every other text "
                f"tensor is {str(dtype).removeprefix('torch.')}"
            )
    declared = config.text.get("dtype") or raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(declared, str) and declared != str(dtype).removeprefix("torch."):
        notes.append(
            f"config.json declares dtype {declared!r}; the weights are {dtype} and are kept as stored"
        )
    ordered = {n: text[n] for n in expected}
    return HFSource(directory, raw, hf_config, spec, prefix, store, ordered, dtype, skipped, notes)


# ---- whole-checkpoint read (parity harness) --------------------------------------------------------------


@dataclass
class HFCheckpoint:
    """Text tensors of a checkpoint, by relative name, plus what was skipped."""

    directory: Path
    prefix: str
    tensors: dict[str, torch.Tensor]
    skipped: list[str] = field(default_factory=list)


def read_hf_checkpoint(directory: Path) -> HFCheckpoint:
    """Load all text tensors of an HF checkpoint directory into memory (relative names; not validated)."""
    directory = Path(directory)
    store = SafetensorsDir(directory, "checkpoint")
    prefix, text, skipped = _classify(store)
    return HFCheckpoint(directory, prefix, {n: read_tensor(i) for n, i in text.items()}, skipped)


# ---- writing ---------------------------------------------------------------------------------------------


#: Export targets of :func:`write_hf_config` / ``convert mcore-to-hf --for``.
EXPORT_TARGETS = ("hf", "sglang")


def write_hf_config(directory: Path, hf_text_config: Any, dtype: torch.dtype, target: str = "hf") -> None:
    """Write ``config.json`` of an exported checkpoint with weights of ``dtype``.

    ``target="hf"``: a ``gemma4_text`` ``Gemma4ForCausalLM`` config (weights under ``model.``).
    ``target="sglang"``: the multimodal ``gemma4`` wrapper, ``Gemma4ForConditionalGeneration``, the text
    config under ``text_config`` (weights under ``model.language_model.``) and transformers' default
    ``vision_config`` (no vision weights are written: a text-only export). SGLang 0.5.23 flattens Gemma 4's
    per-layer head dims into ``head_dim`` / ``swa_head_dim`` only for the multimodal model types
    (``sglang/srt/utils/hf_transformers/config.py``: ``_GEMMA4_MODEL_TYPES`` lines 66-73, the call at
    311-312); for ``gemma4_text`` it later reads ``head_dim``, which transformers refuses on a config with a
    ``per_layer_config`` (``AmbiguousGlobalPerLayerAttributeError``), so the engine does not start.
    """
    if target not in EXPORT_TARGETS:
        raise InvalidInputError(f"--for must be one of {list(EXPORT_TARGETS)}, got {target!r}")
    cfg = type(hf_text_config).from_dict(hf_text_config.to_dict())
    if target == "hf":
        cfg.architectures = ["Gemma4ForCausalLM"]
        cfg.dtype = dtype
        cfg.to_json_file(Path(directory) / "config.json", use_diff=True)
        return
    from transformers import Gemma4Config, Gemma4VisionConfig

    cfg.architectures = None
    cfg.dtype = dtype
    wrapper = Gemma4Config(text_config=cfg, vision_config=Gemma4VisionConfig(), audio_config=None)
    wrapper.architectures = ["Gemma4ForConditionalGeneration"]
    wrapper.tie_word_embeddings = cfg.tie_word_embeddings
    wrapper.dtype = dtype
    wrapper.to_json_file(Path(directory) / "config.json", use_diff=True)

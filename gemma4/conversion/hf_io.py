"""Reading HF Gemma 4 checkpoint directories (config.json + safetensors, single file or sharded).

Text weights are returned with names relative to the text-model prefix: ``model.`` (``Gemma4ForCausalLM``)
or ``model.language_model.`` (``Gemma4ForConditionalGeneration``). Vision/audio towers are skipped and
reported. Only safetensors are read (no pickle).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma4.conversion.mapping import HF_CAUSAL_LM_PREFIX, HF_CONDITIONAL_GENERATION_PREFIX
from gemma4.errors import InvalidInputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
NON_TEXT_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


@dataclass
class HFCheckpoint:
    """Text tensors of a checkpoint, by relative name, plus what was skipped."""

    directory: Path
    prefix: str
    tensors: dict[str, torch.Tensor]
    skipped: list[str] = field(default_factory=list)


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when there is one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"{directory}: checkpoint directory not found")
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"{index}: unreadable safetensors index ({exc})") from exc
        paths = [directory / f for f in files]
        for p in paths:
            if not p.is_file():
                raise InvalidInputError(f"{index}: names shard {p.name}, which does not exist")
        return paths
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise InvalidInputError(f"{directory}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")
    return found


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one safetensors file, one tensor at a time."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except InvalidInputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise InvalidInputError(f"{path}: unreadable safetensors file ({exc})") from exc


def detect_prefix(names: list[str]) -> str:
    """``model.language_model.`` if any name has it, else ``model.``."""
    if any(n.startswith(HF_CONDITIONAL_GENERATION_PREFIX) for n in names):
        return HF_CONDITIONAL_GENERATION_PREFIX
    return HF_CAUSAL_LM_PREFIX


def read_hf_checkpoint(directory: Path) -> HFCheckpoint:
    """Load all text tensors of an HF checkpoint directory into memory (relative names)."""
    directory = Path(directory)
    raw: dict[str, torch.Tensor] = {}
    for path in safetensors_files(directory):
        for name, tensor in iter_safetensors(path):
            raw[name] = tensor
    prefix = detect_prefix(list(raw))
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, tensor in raw.items():
        if name.startswith(NON_TEXT_PREFIXES):
            skipped.append(name)
        elif name == "lm_head.weight":
            out[name] = tensor
        elif name.startswith(prefix):
            out[name[len(prefix) :]] = tensor
        else:
            raise InvalidInputError(f"{directory}: unexpected tensor {name!r} (expected prefix {prefix!r})")
    return HFCheckpoint(directory, prefix, out, skipped)

"""Optional: the first K layers of a released checkpoint in both models (``GEMMA4_HF_CHECKPOINT=DIR``,
``GEMMA4_HF_LAYERS=K``; default: up to and including the first full-attention layer)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from device_parity import run_device_parity

from harness.parity import ParitySource

pytestmark = pytest.mark.gpu


def truncated_source(directory: Path, layers: int | None) -> ParitySource:
    """The checkpoint's text model cut after ``layers`` decoder layers (final norm and tied head kept)."""
    from gemma4.config import FULL, hf_text_config_from_any, text_spec_from_hf
    from gemma4.conversion.hf_io import open_hf_checkpoint
    from gemma4.conversion.mapping import expected_hf_names
    from gemma4.errors import InvalidInputError

    src = open_hf_checkpoint(directory)
    raw = copy.deepcopy(src.raw_config.get("text_config") or src.raw_config)
    total = src.spec.num_layers
    k = layers or (src.spec.layer_types.index(FULL) + 1 if FULL in src.spec.layer_types else total)
    if not 1 <= k <= total:
        raise InvalidInputError(f"GEMMA4_HF_LAYERS={k}: the checkpoint has {total} layers")
    if k < total and (raw.get("hidden_size_per_layer_input") or 0) > 0:
        raise InvalidInputError(
            "per-layer-embedding checkpoints (E2B/E4B) cannot be cut: their PLE table spans all layers"
        )
    shared = int(raw.get("num_kv_shared_layers") or 0)
    if k < total and shared:
        if k > total - shared:
            raise InvalidInputError(
                f"GEMMA4_HF_LAYERS={k} cuts into the KV-shared layers (from {total - shared})"
            )
        raw["num_kv_shared_layers"] = 0
    raw.update(num_hidden_layers=k, layer_types=list(raw["layer_types"])[:k], model_type="gemma4_text")
    if isinstance(raw.get("per_layer_config"), dict):
        raw["per_layer_config"] = {i: c for i, c in raw["per_layer_config"].items() if int(i) < k}
    cfg = hf_text_config_from_any(raw)
    spec = text_spec_from_hf(cfg)
    weights = {name: src.read(name) for name in expected_hf_names(spec)}
    return ParitySource(f"checkpoint:{directory} (first {k} of {total} layers)", cfg, spec, weights)


def test_released_checkpoint_first_layers(gpu_report):
    directory = os.environ.get("GEMMA4_HF_CHECKPOINT")
    if not directory:
        pytest.skip(
            "optional: set GEMMA4_HF_CHECKPOINT=DIR (and GEMMA4_HF_LAYERS=K) to compare a released checkpoint"
        )
    layers = int(os.environ["GEMMA4_HF_LAYERS"]) if os.environ.get("GEMMA4_HF_LAYERS") else None
    source = truncated_source(Path(directory), layers)
    result = gpu_report(run_device_parity(source, device="cuda", dtype=torch.bfloat16, batch=1, seq_len=128))
    assert result["pass"], result["failures"]

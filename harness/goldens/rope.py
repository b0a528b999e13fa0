"""Family ``rope``: HF's RoPE tables per layer type (``inv_freq``, cos, sin) for positions 0..63.

Recorded from ``Gemma4TextRotaryEmbedding`` of the seeded reference (the exact-fp64 variant for fp64, stock
HF for fp32): ``inv_freq.<type>`` ``[d/2]``, ``cos.<type>`` / ``sin.<type>`` ``[1, 64, d]``. Checked against
our :mod:`gemma4.model.rope` (``inv_freq``, ``rope_angles`` -> ``angles_for`` -> ``cos_sin``) and against
HF now. Tables are in [-1, 1], so the bound is the dtype's activation bound (absolute here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from harness.goldens.outcome import PASS, REGRESSION, Outcome, classify
from harness.goldens.registry import Case, Recording, standard_cases
from harness.goldens.store import GoldenError, file_with_suffix, load_safetensors, safetensors_metadata
from harness.tolerances import tolerance_for

NAME = "rope"
DESCRIPTION = "RoPE tables per layer type: inv_freq, cos, sin for positions 0..63 (HF rotary embedding)"
SUFFIX = ".safetensors"
POSITIONS = 64


def cases() -> list[Case]:
    """Every golden preset (dense, MoE, PLE + KV sharing) in fp64 and fp32."""
    return standard_cases(NAME)


def _names(spec: Any) -> list[str]:
    return [f"{kind}.{t}" for t in spec.present_layer_types for kind in ("inv_freq", "cos", "sin")]


def hf_tables(config: dict[str, Any], dtype: torch.dtype, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """HF's tables (spec, {name: tensor}) from the reference model's rotary embedding."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from harness.reference import build_reference_model

    cfg = hf_text_config_from_any(config)
    spec = text_spec_from_hf(cfg)
    rotary = build_reference_model(cfg, dtype, seed=seed).model.rotary_emb
    positions = torch.arange(POSITIONS)[None]
    x = torch.zeros((), dtype=dtype)
    out: dict[str, torch.Tensor] = {}
    exact = getattr(rotary, "_fp64_inv_freq", None)  # the exact-fp64 reference keeps its own fp64 table
    for t in spec.present_layer_types:
        out[f"inv_freq.{t}"] = (exact[t] if exact is not None else getattr(rotary, f"{t}_inv_freq")).clone()
        with torch.no_grad():
            cos, sin = rotary(x, positions, t)
        out[f"cos.{t}"], out[f"sin.{t}"] = cos.clone(), sin.clone()
    return spec, out


def our_tables(spec: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The same tables from :mod:`gemma4.model.rope`, reshaped to HF's ``[1, s, d]``."""
    from gemma4.model.numerics import compute_dtype
    from gemma4.model.rope import angles_for, cos_sin, inv_freq, rope_angles

    positions = torch.arange(POSITIONS)[None]
    angles = rope_angles(spec, positions, dtype)
    out: dict[str, torch.Tensor] = {}
    for t in spec.present_layer_types:
        out[f"inv_freq.{t}"] = inv_freq(spec.rope[t], spec.head_dim_of(t), compute_dtype(dtype))
        cos, sin = cos_sin(angles_for(spec, angles, t), dtype)  # [s, 1, 1, d]
        out[f"cos.{t}"] = cos.squeeze(2).transpose(0, 1)
        out[f"sin.{t}"] = sin.squeeze(2).transpose(0, 1)
    return out


def _worst(now: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names: list[str]) -> tuple[float, str]:
    from harness.compare import tensor_diff

    worst, where = 0.0, names[0]
    for n in names:
        if now[n].shape != ref[n].shape:
            return float("inf"), f"{n} (shape {tuple(now[n].shape)} vs {tuple(ref[n].shape)})"
        d = tensor_diff(now[n], ref[n]).max_abs
        if not d <= worst:
            worst, where = d, n
    return worst, where


def record(case: Case) -> Recording:
    """HF's tables for the preset."""
    from safetensors.torch import save

    from harness.parity import DTYPES
    from harness.presets import preset_config_dict

    config = preset_config_dict(case.preset)
    spec, tables = hf_tables(config, DTYPES[case.dtype], case.seed)
    data = save(
        {k: v.contiguous() for k, v in tables.items()},
        metadata=safetensors_metadata(case.name, NAME),
    )
    return Recording(
        files={SUFFIX: data},
        fields={
            "inputs": {"kind": "position ids 0..N-1, batch 1", "positions": POSITIONS},
            "tolerance": tolerance_for(DTYPES[case.dtype]).name,
            "contents": {"tensors": _names(spec), "side": "HF Gemma4TextRotaryEmbedding"},
            "config": config,
        },
    )


def describe_change(case: Case, old_files: dict[str, bytes] | None, new: Recording) -> str:
    """How much the tables moved."""
    from safetensors.torch import load

    new_t = load(new.files[SUFFIX])
    if not old_files:
        return f"created {case.name} ({len(new_t)} tensors)"
    try:
        old_t = load(next(v for k, v in old_files.items() if k.endswith(SUFFIX)))
    except Exception:
        return f"updated {case.name} (the old golden was unreadable)"
    if set(old_t) != set(new_t):
        return f"updated {case.name}: tensor names changed ({sorted(set(old_t) ^ set(new_t))})"
    worst, where = _worst(new_t, old_t, sorted(new_t))
    return f"unchanged {case.name}" if worst == 0.0 else f"updated {case.name}: max|d| {worst:.2e} at {where}"


def check(case: Case, entry: dict[str, Any], files: dict[str, bytes], goldens_dir: Path) -> Outcome:
    """Our tables and HF's now against the golden tables."""
    from harness.parity import DTYPES

    rel, data = file_with_suffix(files, SUFFIX, goldens_dir, case.name)
    config, dtype_name, seed = entry.get("config"), entry.get("dtype"), entry.get("seed")
    if not isinstance(config, dict) or dtype_name not in DTYPES or not isinstance(seed, int):
        raise GoldenError(
            f"{goldens_dir / 'manifest.json'}: case {case.name!r} lacks a valid config/dtype/seed"
        )
    dtype = DTYPES[dtype_name]
    spec, hf_now = hf_tables(json.loads(json.dumps(config)), dtype, seed)
    names = _names(spec)
    golden = load_safetensors(data, goldens_dir / rel, names)
    ours_now = our_tables(spec, dtype)
    bound = tolerance_for(dtype).activations_max_scaled
    ours, ours_at = _worst(ours_now, golden, names)
    hf, hf_at = _worst(hf_now, golden, names)
    live, live_at = _worst(ours_now, hf_now, names)
    status = classify(ours <= bound, hf <= bound, live <= bound)
    if status == PASS:
        message = f"ours vs golden max|d| {ours:.1e}; HF vs golden {hf:.1e} (bound {bound:.0e})"
    elif status == REGRESSION:
        message = (
            f"our RoPE tables moved away from golden {rel}: max|d| {ours:.2e} > {bound:.0e} at {ours_at}"
        )
    else:
        message = (
            f"HF's RoPE tables moved away from golden {rel}: max|d| {hf:.2e} > {bound:.0e} at {hf_at}"
            + (
                "; ours still match the golden"
                if ours <= bound
                else f"; ours moved with HF (ours vs HF {live:.1e})"
            )
        )
    return Outcome(
        case.name,
        status,
        message,
        metrics={"file": rel, "bound": bound, "ours_vs_golden": ours, "hf_vs_golden": hf, "ours_vs_hf": live},
    )

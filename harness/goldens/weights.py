"""Family ``weights``: sha256 of every seeded HF reference tensor and of every Megatron tensor ``hf_to_mcore``
makes from them, so a silent change of the mapping (a transposed pack, a swapped gate/up) is caught even
where the forward pass would be insensitive to it.

Stored as JSON (one line per tensor, reviewable in a diff): ``{"hf": {name: {sha256, shape, dtype}},
"mcore": {...}}``. The hash covers dtype, shape and raw bytes (:func:`harness.goldens.store.tensor_sha256`).

Checked: a changed HF checksum is HF drift (the reference weights moved: transformers renamed or re-ordered
parameters, or the weight drawing changed); a changed Megatron checksum with unchanged HF checksums is a
regression of the conversion. When both moved, the mapping is judged by its own round trip
(``mcore_to_hf(hf_to_mcore(w)) == w``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from harness.goldens.outcome import PASS, REGRESSION, Outcome, classify
from harness.goldens.registry import Case, Recording, standard_cases
from harness.goldens.store import GoldenError, file_with_suffix, load_json_bytes, tensor_sha256

NAME = "weights"
DESCRIPTION = "sha256 of the seeded HF reference weights and of every converted Megatron tensor (hf_to_mcore)"
SUFFIX = ".json"


def cases() -> list[Case]:
    """Every golden preset (dense, MoE, PLE + KV sharing) in fp64 and fp32."""
    return standard_cases(NAME)


def _summary(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "sha256": tensor_sha256(t),
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
        }
        for name, t in sorted(tensors.items())
    }


def compute(config: dict[str, Any], dtype: torch.dtype, seed: int) -> tuple[dict, dict, bool]:
    """(HF checksums, Megatron checksums, whether the mapping round-trips) for the seeded reference."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from gemma4.conversion.mapping import hf_to_mcore, mcore_to_hf
    from harness.reference import build_reference_model, hf_text_state_dict

    cfg = hf_text_config_from_any(config)
    spec = text_spec_from_hf(cfg)
    hf = hf_text_state_dict(build_reference_model(cfg, dtype, seed=seed))
    mcore = hf_to_mcore(hf, spec)
    back = mcore_to_hf(mcore, spec)
    round_trips = set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    return _summary(hf), _summary(mcore), round_trips


def _differences(now: dict[str, Any], golden: Any) -> list[str]:
    if not isinstance(golden, dict):
        return ["(no checksums)"]
    out = [f"{n} (new)" for n in sorted(set(now) - set(golden))]
    out += [f"{n} (gone)" for n in sorted(set(golden) - set(now))]
    for n in sorted(set(now) & set(golden)):
        g = golden[n]
        if not isinstance(g, dict) or g.get("sha256") != now[n]["sha256"]:
            shape = f", shape {g.get('shape')} -> {now[n]['shape']}" if isinstance(g, dict) else ""
            if isinstance(g, dict) and g.get("shape") == now[n]["shape"]:
                shape = ""
            out.append(f"{n} (sha256 differs{shape})")
    return out


def record(case: Case) -> Recording:
    """Checksums of the preset's seeded weights, both sides."""
    from harness.parity import DTYPES
    from harness.presets import preset_config_dict

    config = preset_config_dict(case.preset)
    hf, mcore, _ = compute(config, DTYPES[case.dtype], case.seed)
    body = {"case": case.name, "hf": hf, "mcore": mcore}
    data = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8")
    return Recording(
        files={SUFFIX: data},
        fields={
            "inputs": {"kind": "seeded reference weights (harness.reference.build_reference_model)"},
            "tolerance": "exact (sha256)",
            "contents": {"hf_tensors": len(hf), "mcore_tensors": len(mcore), "mapping": "hf_to_mcore (TP=1)"},
            "config": config,
        },
    )


def describe_change(case: Case, old_files: dict[str, bytes] | None, new: Recording) -> str:
    """Which checksums changed."""
    new_body = json.loads(new.files[SUFFIX])
    if not old_files:
        return (
            f"created {case.name} ({len(new_body['hf'])} HF and {len(new_body['mcore'])} Megatron checksums)"
        )
    try:
        old_body = json.loads(next(v for k, v in old_files.items() if k.endswith(SUFFIX)))
    except Exception:
        return f"updated {case.name} (the old golden was unreadable)"
    hf = _differences(new_body["hf"], old_body.get("hf"))
    mc = _differences(new_body["mcore"], old_body.get("mcore"))
    if not hf and not mc:
        return f"unchanged {case.name}"
    first = (hf + mc)[0]
    return f"updated {case.name}: {len(hf)} HF and {len(mc)} Megatron checksums changed (first: {first})"


def check(case: Case, entry: dict[str, Any], files: dict[str, bytes], goldens_dir: Path) -> Outcome:
    """Recompute both sides' checksums and compare with the golden."""
    from harness.parity import DTYPES

    rel, data = file_with_suffix(files, SUFFIX, goldens_dir, case.name)
    config, dtype_name, seed = entry.get("config"), entry.get("dtype"), entry.get("seed")
    if not isinstance(config, dict) or dtype_name not in DTYPES or not isinstance(seed, int):
        raise GoldenError(
            f"{goldens_dir / 'manifest.json'}: case {case.name!r} lacks a valid config/dtype/seed"
        )
    golden = load_json_bytes(data, goldens_dir / rel)
    if (
        not isinstance(golden, dict)
        or not isinstance(golden.get("hf"), dict)
        or not isinstance(golden.get("mcore"), dict)
    ):
        raise GoldenError(f"{goldens_dir / rel}: unreadable, expected objects 'hf' and 'mcore'")
    hf, mcore, round_trips = compute(json.loads(json.dumps(config)), DTYPES[dtype_name], seed)
    hf_diff = _differences(hf, golden["hf"])
    mc_diff = _differences(mcore, golden["mcore"])
    status = classify(not mc_diff, not hf_diff, round_trips)
    if status == PASS:
        message = f"{len(hf)} HF and {len(mcore)} Megatron checksums match"
    elif status == REGRESSION:
        message = (
            f"converted Megatron weights moved away from golden {rel}: {len(mc_diff)} of {len(mcore)} tensors "
            f"differ (first: {mc_diff[0]})"
            + ("" if not hf_diff else f"; HF weights moved too ({hf_diff[0]})")
        )
    else:
        message = (
            f"the HF reference weights moved away from golden {rel}: {len(hf_diff)} of {len(hf)} tensors differ "
            f"(first: {hf_diff[0]})"
            + ("; the converted weights still match" if not mc_diff else "; the mapping still round-trips")
        )
    return Outcome(
        case.name,
        status,
        message,
        details=[f"HF {d}" for d in hf_diff[:5]] + [f"Megatron {d}" for d in mc_diff[:5]],
        metrics={
            "file": rel,
            "hf_changed": len(hf_diff),
            "mcore_changed": len(mc_diff),
            "round_trips": round_trips,
        },
    )

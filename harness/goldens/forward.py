"""Family ``forward``: HF logits and per-layer hidden states of each preset, in fp64 and fp32.

Recorded: the input ids (seeded, ``batch`` x ``seq_len``) and HF's tensor at every capture point of
:func:`harness.parity.capture_order` (embedding, each layer's attention / mlp / output, final_norm, logits),
in the run dtype. Selection rule: every point, because at tiny-preset size a whole fp64 case is 0.7-1 MB and
localising a regression to a layer and submodule is what the goldens are for; a larger preset would store
``layer.{i}.output`` only (recording refuses to exceed the size budget either way).

Checked: the HF model is rebuilt from the *recorded* config and seed, our Megatron model gets its weights,
both run on the recorded ids. Ours vs golden, HF vs golden and ours vs HF are each judged with the tolerance
policy of the dtype (:func:`harness.tolerances.tolerance_for`), the same bounds ``gemma4-harness parity`` uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.goldens.outcome import PASS, REGRESSION, Outcome, classify
from harness.goldens.registry import Case, Recording, standard_cases
from harness.goldens.store import GoldenError, file_with_suffix, load_safetensors, safetensors_metadata
from harness.tolerances import Tolerance, tolerance_for

NAME = "forward"
DESCRIPTION = "HF logits and hidden states at every capture point (embedding, layer.{i}.*, final_norm)"
SUFFIX = ".safetensors"


def cases() -> list[Case]:
    """Every golden preset (dense, MoE, PLE + KV sharing) in fp64 and fp32."""
    return standard_cases(NAME)


def _dtype(name: str) -> torch.dtype:
    from harness.parity import DTYPES

    return DTYPES[name]


def run_hf(
    config: dict[str, Any], dtype: torch.dtype, seed: int, ids: torch.Tensor | None = None
) -> tuple[torch.nn.Module, Any, torch.Tensor, dict[str, torch.Tensor]]:
    """Build the seeded HF reference, run it; returns (model, spec, ids, activations incl. ``logits``)."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from harness.parity import capture_hf, make_inputs
    from harness.presets import DEFAULT_BATCH, DEFAULT_SEQ_LEN
    from harness.reference import build_reference_model

    cfg = hf_text_config_from_any(config)
    spec = text_spec_from_hf(cfg)
    hf = build_reference_model(cfg, dtype, seed=seed)
    if ids is None:
        ids = make_inputs(spec, DEFAULT_BATCH, DEFAULT_SEQ_LEN, seed)
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), capture_hf(hf, acts):
        acts["logits"] = hf(input_ids=ids, use_cache=False).logits.detach()
    return hf, spec, ids, acts


def run_ours(
    hf: torch.nn.Module, spec: Any, dtype: torch.dtype, ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Our Megatron model with the HF model's weights, on ``ids``; activations incl. ``logits``."""
    from gemma4.conversion.mapping import load_hf_into_mcore
    from gemma4.model.build import build_gemma4_model
    from harness.parity import capture_mcore
    from harness.reference import hf_text_state_dict

    ours = build_gemma4_model(spec, dtype)
    load_hf_into_mcore(ours, hf_text_state_dict(hf), spec)
    ours.eval()
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), capture_mcore(ours, acts):
        acts["logits"] = ours(ids).detach()
    return acts


# ---- judging ---------------------------------------------------------------------------------------------


@dataclass
class Judgement:
    """One side against a reference, over every capture point, with the policy's bounds."""

    ok: bool
    first_bad: str | None
    logits_max_abs: float
    logits_max_rel: float
    kl_mean: float
    activations_max_scaled: float
    per_point: dict[str, float]

    def worst_text(self) -> str:
        return f"logits max|d| {self.logits_max_abs:.1e}, activations max scaled {self.activations_max_scaled:.1e}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "first_bad": self.first_bad,
            "logits_max_abs": self.logits_max_abs,
            "logits_max_rel": self.logits_max_rel,
            "kl_mean": self.kl_mean,
            "activations_max_scaled": self.activations_max_scaled,
            "per_point": self.per_point,
        }


def judge(
    now: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], points: list[str], spec: Any, tol: Tolerance
) -> Judgement:
    """Compare ``now`` with ``ref`` at ``points`` (forward order) with the judge ``run_parity`` uses
    (:func:`harness.parity.judge.judge`)."""
    from harness.compare import logit_stats
    from harness.parity.judge import judge as parity_judge
    from harness.parity.judge import point_diffs

    diffs = point_diffs(now, ref, points)
    stats = logit_stats(now["logits"], ref["logits"])
    verdict = parity_judge(diffs, stats, tol, spec)
    logits = diffs.get("logits")
    return Judgement(
        ok=verdict.passed,
        first_bad=verdict.first_bad,
        logits_max_abs=logits.max_abs if logits else 0.0,
        logits_max_rel=logits.max_rel if logits else 0.0,
        kl_mean=stats.kl_mean,
        activations_max_scaled=verdict.activations_max_scaled,
        per_point=verdict.per_point,
    )


# ---- record / check --------------------------------------------------------------------------------------


def record(case: Case) -> Recording:
    """Run HF on the preset and keep every capture point."""
    from safetensors.torch import save

    from harness.parity import capture_order
    from harness.presets import preset_config_dict

    config = preset_config_dict(case.preset)
    dtype = _dtype(case.dtype)
    _, spec, ids, acts = run_hf(config, dtype, case.seed)
    points = capture_order(spec)
    tensors = {"input_ids": ids, **{p: acts[p] for p in points}}
    data = save(
        {k: v.contiguous() for k, v in tensors.items()},
        metadata=safetensors_metadata(case.name, NAME),
    )
    tol = tolerance_for(dtype)
    return Recording(
        files={SUFFIX: data},
        fields={
            "inputs": {
                "kind": "seeded random token ids (harness.parity.make_inputs)",
                "batch": int(ids.shape[0]),
                "seq_len": int(ids.shape[1]),
                "stored_as": "input_ids",
            },
            "tolerance": tol.name,
            "contents": {"points": points, "selection": "every capture point", "side": "HF reference"},
            "config": config,
        },
    )


def describe_change(case: Case, old_files: dict[str, bytes] | None, new: Recording) -> str:
    """How much the new recording moved from the old one."""
    from safetensors.torch import load

    from harness.compare import tensor_diff

    new_t = load(new.files[SUFFIX])
    if not old_files:
        size = sum(len(b) for b in new.files.values())
        return f"created {case.name} ({len(new_t)} tensors, {size / 1e3:.1f} kB)"
    try:
        old_t = load(next(v for k, v in old_files.items() if k.endswith(SUFFIX)))
    except Exception:
        return f"updated {case.name} (the old golden was unreadable)"
    changed = []
    for name, t in new_t.items():
        if name not in old_t or old_t[name].shape != t.shape or old_t[name].dtype != t.dtype:
            changed.append((name, float("inf")))
        elif not torch.equal(old_t[name], t):
            changed.append((name, tensor_diff(t, old_t[name]).max_abs))
    if not changed:
        return f"unchanged {case.name}"
    worst = max(changed, key=lambda x: x[1])
    logits = next((d for n, d in changed if n == "logits"), 0.0)
    return (
        f"updated {case.name}: {len(changed)} of {len(new_t)} tensors changed; logits max|d| {logits:.2e}; "
        f"largest change {worst[1]:.2e} at {worst[0]}"
    )


def check(case: Case, entry: dict[str, Any], files: dict[str, bytes], goldens_dir: Path) -> Outcome:
    """Recompute ours and HF on the recorded ids and judge both against the golden."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from harness.parity import capture_order
    from harness.presets import preset_config_dict

    rel, data = file_with_suffix(files, SUFFIX, goldens_dir, case.name)
    path = goldens_dir / rel
    config, dtype, seed = _recorded(entry, goldens_dir, case)
    spec = text_spec_from_hf(hf_text_config_from_any(config))
    points = capture_order(spec)
    golden = load_safetensors(data, path, ["input_ids", *points])
    ids = golden["input_ids"]
    hf, _, _, hf_now = run_hf(config, dtype, seed, ids=ids)
    for p in points:
        if golden[p].shape != hf_now[p].shape or golden[p].dtype != hf_now[p].dtype:
            raise GoldenError(
                f"{path}: tensor {p!r} is {golden[p].dtype} {tuple(golden[p].shape)}, the recorded case implies "
                f"{hf_now[p].dtype} {tuple(hf_now[p].shape)}"
            )
    ours_now = run_ours(hf, spec, dtype, ids)
    tol = tolerance_for(dtype)
    ours = judge(ours_now, golden, points, spec, tol)
    hf_j = judge(hf_now, golden, points, spec, tol)
    live = judge(ours_now, hf_now, points, spec, tol)
    status = classify(ours.ok, hf_j.ok, live.ok)

    details = []
    if entry.get("tolerance") != tol.name:
        details.append(f"tolerance policy is now {tol.name!r}; recorded with {entry.get('tolerance')!r}")
    try:
        if preset_config_dict(case.preset) != config:
            details.append(
                f"preset {case.preset} changed since recording; checked against the recorded config"
            )
    except Exception:
        details.append(f"preset {case.preset} no longer exists; checked against the recorded config")
    message = _message(status, ours, hf_j, live, rel)
    return Outcome(
        case.name,
        status,
        message,
        details,
        metrics={
            "file": rel,
            "tolerance": tol.to_json(),
            "ours_vs_golden": ours.to_json(),
            "hf_vs_golden": hf_j.to_json(),
            "ours_vs_hf": live.to_json(),
            "sliding_window": spec.sliding_window,
        },
    )


def _recorded(entry: dict[str, Any], goldens_dir: Path, case: Case) -> tuple[dict, torch.dtype, int]:
    from harness.parity import DTYPES

    config, dtype, seed = entry.get("config"), entry.get("dtype"), entry.get("seed")
    if not isinstance(config, dict) or dtype not in DTYPES or not isinstance(seed, int):
        raise GoldenError(
            f"{goldens_dir / 'manifest.json'}: case {case.name!r} lacks a valid config/dtype/seed"
        )
    return json.loads(json.dumps(config)), DTYPES[dtype], seed


def _message(status: str, ours: Judgement, hf: Judgement, live: Judgement, rel: str) -> str:
    if status == PASS:
        return f"ours vs golden: {ours.worst_text()}; HF vs golden: {hf.worst_text()}"
    if status == REGRESSION:
        tail = "HF still matches the golden" if hf.ok else f"HF moved too (first at {hf.first_bad})"
        return f"our model moved away from golden {rel}: first at {ours.first_bad}; {tail}"
    if ours.ok:
        return f"HF moved away from golden {rel}: first at {hf.first_bad}; our model still matches the golden"
    return (
        f"HF and our model both moved away from golden {rel} (first at {hf.first_bad}) and still agree with "
        f"each other ({live.worst_text()}): a shared dependency or the reference builder changed"
    )

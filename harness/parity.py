"""HF vs Megatron parity of a whole Gemma 4 text model: logits, every layer's activations, gradients.

Both models get the same weights (the reference's, mapped through :mod:`gemma4.conversion.mapping`) and the
same token ids. Activations are captured at the same points on both sides, in forward order::

    embedding, layer.{i}.attention, layer.{i}.mlp, layer.{i}.output, ..., final_norm, logits

so the first point that exceeds the tolerance localises a bug to a layer and submodule.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.config import Gemma4TextSpec, hf_text_config_from_any, text_spec_from_hf
from gemma4.errors import InvalidInputError
from harness.compare import TensorDiff, logit_stats, tensor_diff
from harness.tolerances import Tolerance, tolerance_for

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ParitySource:
    """What a parity run compares: an HF text config and optionally real weights."""

    label: str
    hf_config: Any
    spec: Gemma4TextSpec
    weights: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


def resolve_source(
    preset: str | None = None, hf_config: str | Path | None = None, hf_checkpoint: str | Path | None = None
) -> ParitySource:
    """Exactly one of ``preset``, ``hf_config`` (config.json) or ``hf_checkpoint`` (directory)."""
    chosen = [x for x in (preset, hf_config, hf_checkpoint) if x is not None]
    if len(chosen) != 1:
        raise InvalidInputError("give exactly one of --preset, --hf-config, --hf-checkpoint")
    if preset is not None:
        from harness.presets import preset_config_dict

        cfg = hf_text_config_from_any(preset_config_dict(preset))
        return ParitySource(f"preset:{preset}", cfg, text_spec_from_hf(cfg))
    if hf_config is not None:
        cfg = hf_text_config_from_any(Path(hf_config))
        return ParitySource(f"config:{hf_config}", cfg, text_spec_from_hf(cfg))

    from gemma4.conversion.hf_io import read_hf_checkpoint
    from gemma4.conversion.mapping import expected_hf_names

    directory = Path(hf_checkpoint)
    cfg = hf_text_config_from_any(directory)
    spec = text_spec_from_hf(cfg)
    ckpt = read_hf_checkpoint(directory)
    expected = set(expected_hf_names(spec))
    if spec.tie_word_embeddings:
        ckpt.tensors.pop("lm_head.weight", None)  # tied: identical to embed_tokens if present at all
    missing = sorted(expected - set(ckpt.tensors))
    unexpected = sorted(set(ckpt.tensors) - expected)
    if missing:
        raise InvalidInputError(
            f"{directory}: tensor {missing[0]!r} is missing ({len(missing)} missing in total)"
        )
    if unexpected:
        raise InvalidInputError(f"{directory}: unexpected tensor {(ckpt.prefix + unexpected[0])!r}")
    notes = [f"weights from {directory} (prefix {ckpt.prefix!r})"]
    if ckpt.skipped:
        notes.append(f"skipped {len(ckpt.skipped)} non-text tensors (vision/audio towers)")
    return ParitySource(f"checkpoint:{directory}", cfg, spec, ckpt.tensors, notes)


# ---- activation capture ---------------------------------------------------------------------------------


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_hf(model: torch.nn.Module, store: dict[str, torch.Tensor]):
    """Record the reference's activations (``[b, s, h]``) at the standard capture points."""
    m = model.model
    hooks = [
        m.embed_tokens.register_forward_hook(
            lambda mod, i, o: store.__setitem__("embedding", o.detach().clone())
        )
    ]
    for idx, layer in enumerate(m.layers):
        for sub, name in ((layer.self_attn, "attention"), (layer.mlp, "mlp"), (layer, "output")):
            key = f"layer.{idx}.{name}"
            hooks.append(
                sub.register_forward_hook(
                    lambda mod, i, o, key=key: store.__setitem__(key, _first(o).detach().clone())
                )
            )
    hooks.append(
        m.norm.register_forward_hook(lambda mod, i, o: store.__setitem__("final_norm", o.detach().clone()))
    )
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def capture_mcore(model: torch.nn.Module, store: dict[str, torch.Tensor]):
    """Record our activations at the same points, transposed from ``[s, b, h]`` to ``[b, s, h]``."""

    def put(key, t):
        store[key] = t.detach().transpose(0, 1).clone()

    layers = model.decoder.layers
    hooks = [
        layers[0].register_forward_pre_hook(
            lambda mod, args, kwargs: put(
                "embedding", kwargs.get("hidden_states", args[0] if args else None)
            ),
            with_kwargs=True,
        )
    ]
    for idx, layer in enumerate(layers):
        for sub, name in ((layer.self_attention, "attention"), (layer.mlp, "mlp"), (layer, "output")):
            key = f"layer.{idx}.{name}"
            hooks.append(sub.register_forward_hook(lambda mod, i, o, key=key: put(key, _first(o))))
    hooks.append(model.decoder.final_layernorm.register_forward_hook(lambda mod, i, o: put("final_norm", o)))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def capture_order(spec: Gemma4TextSpec) -> list[str]:
    """Capture point names in forward order."""
    names = ["embedding"]
    for i in range(spec.num_layers):
        names += [f"layer.{i}.attention", f"layer.{i}.mlp", f"layer.{i}.output"]
    return names + ["final_norm", "logits"]


def describe_point(spec: Gemma4TextSpec, name: str) -> str:
    """Human-readable capture point, e.g. ``layer 3 (full_attention) attention``."""
    if name.startswith("layer."):
        _, idx, sub = name.split(".")
        return f"layer {idx} ({spec.layer_types[int(idx)]}) {sub}"
    return name


# ---- the run ---------------------------------------------------------------------------------------------


def make_inputs(spec: Gemma4TextSpec, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded random token ids ``[batch, seq_len]``."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, spec.vocab_size, (batch, seq_len), generator=gen)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy, computed identically for both sides (in fp64 for fp64 runs)."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v).to(cdt), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


def _versions() -> dict[str, str]:
    import megatron.core
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron-core": getattr(megatron.core, "__version__", "unknown"),
    }


def run_parity(
    source: ParitySource,
    dtype: torch.dtype = torch.float64,
    *,
    batch: int = 2,
    seq_len: int = 24,
    seed: int = 0,
    grads: bool = False,
    tolerance: Tolerance | None = None,
) -> dict[str, Any]:
    """Build both models, run them on the same ids, compare. Returns the JSON-ready result dict."""
    from gemma4.conversion.mapping import hf_to_mcore, load_hf_into_mcore
    from gemma4.model.build import build_gemma4_model
    from harness.reference import build_reference_model, hf_text_state_dict

    if batch < 1 or seq_len < 2:
        raise InvalidInputError(f"--batch must be >= 1 and --seq-len >= 2 (got {batch}, {seq_len})")
    tol = tolerance or tolerance_for(dtype)
    spec = source.spec
    t0 = time.perf_counter()
    hf = build_reference_model(source.hf_config, dtype, seed=seed, weights=source.weights)
    hf_weights = hf_text_state_dict(hf)
    ours = build_gemma4_model(spec, dtype)
    load_hf_into_mcore(ours, hf_weights, spec)
    ours.eval()
    ids = make_inputs(spec, batch, seq_len, seed)
    t_build = time.perf_counter() - t0

    ref_acts: dict[str, torch.Tensor] = {}
    our_acts: dict[str, torch.Tensor] = {}
    t1 = time.perf_counter()
    with torch.set_grad_enabled(grads), capture_hf(hf, ref_acts):
        ref_logits = hf(input_ids=ids, use_cache=False).logits
    with torch.set_grad_enabled(grads), capture_mcore(ours, our_acts):
        our_logits = ours(ids)
    ref_acts["logits"], our_acts["logits"] = ref_logits.detach(), our_logits.detach()
    t_fwd = time.perf_counter() - t1

    points: dict[str, TensorDiff] = {
        name: tensor_diff(our_acts[name], ref_acts[name]) for name in capture_order(spec)
    }
    stats = logit_stats(our_logits, ref_logits)
    logits_diff = points["logits"]
    activations_worst = max(d.scaled for n, d in points.items() if n != "logits")

    failures: list[str] = []
    first_divergence = None
    for name in capture_order(spec):
        d = points[name]
        bad = d.max_abs > tol.logits_max_abs if name == "logits" else d.scaled > tol.activations_max_scaled
        if bad:
            first_divergence = describe_point(spec, name)
            break
    if logits_diff.max_abs > tol.logits_max_abs:
        failures.append(f"logits max abs {logits_diff.max_abs:.3e} > {tol.logits_max_abs:.0e}")
    if activations_worst > tol.activations_max_scaled:
        failures.append(
            f"activations max scaled error {activations_worst:.3e} > {tol.activations_max_scaled:.0e}"
        )
    if tol.kl_max is not None and stats.kl_mean > tol.kl_max:
        failures.append(f"mean KL {stats.kl_mean:.3e} > {tol.kl_max:.0e}")
    if tol.argmax_min is not None and stats.argmax_agreement < tol.argmax_min:
        failures.append(f"argmax agreement {stats.argmax_agreement:.3f} < {tol.argmax_min}")

    grad_report: dict[str, Any] | None = None
    if grads:
        t2 = time.perf_counter()
        lm_loss(ref_logits, ids).backward()
        lm_loss(our_logits, ids).backward()
        hf_grads = {}
        for k, v in hf_weights.items():
            param = dict(hf.named_parameters()).get(("" if k.startswith("lm_head.") else "model.") + k)
            hf_grads[k] = param.grad if param is not None else torch.zeros_like(v)
        mapped = hf_to_mcore(hf_grads, spec)
        grad_diffs = {}
        for name, p in ours.named_parameters():
            if p.grad is None:
                failures.append(f"parameter {name} got no gradient")
                continue
            d = tensor_diff(p.grad, mapped[name])
            grad_diffs[name] = {
                "max_abs": d.max_abs,
                "ref_max_abs": d.ref_max_abs,
                "scaled": d.max_abs / max(d.ref_max_abs, 1e-300),
            }
        worst_name = max(grad_diffs, key=lambda n: grad_diffs[n]["scaled"]) if grad_diffs else None
        worst = grad_diffs[worst_name]["scaled"] if worst_name else 0.0
        grad_report = {
            "max_scaled": worst,
            "worst_parameter": worst_name,
            "per_parameter": grad_diffs,
            "seconds": time.perf_counter() - t2,
        }
        if tol.grads_max_scaled is not None and worst > tol.grads_max_scaled:
            failures.append(
                f"gradient of {worst_name}: scaled error {worst:.3e} > {tol.grads_max_scaled:.0e}"
            )
            if first_divergence is None:
                first_divergence = f"gradient of {worst_name}"

    if first_divergence is None and failures:
        first_divergence = "logits"
    return {
        "pass": not failures,
        "source": source.label,
        "dtype": str(dtype).removeprefix("torch."),
        "exact_fp64_reference": dtype == torch.float64,
        "batch": batch,
        "seq_len": seq_len,
        "seed": seed,
        "metrics": {
            "logits": logits_diff.to_json(),
            "kl_mean": stats.kl_mean,
            "kl_max": stats.kl_max,
            "argmax_agreement": stats.argmax_agreement,
            "max_abs_logprob": stats.max_abs_logprob,
            "activations_max_scaled": activations_worst,
            "grads_max_scaled": grad_report["max_scaled"] if grad_report else None,
        },
        "tolerance": tol.to_json(),
        "first_divergence": first_divergence,
        "failures": failures,
        "per_point": {name: d.to_json() for name, d in points.items()},
        "grads": grad_report,
        "config": spec.to_json_dict(),
        "notes": source.notes,
        "timings_s": {"build": t_build, "forward": t_fwd},
        "versions": _versions(),
        "_tensors": {
            "input_ids": ids,
            "megatron_logits": our_logits.detach(),
            "hf_logits": ref_logits.detach(),
        },
    }

"""Step 3, the reference: HF transformers (built by :mod:`harness.reference`) on the inputs, its
activations at the capture points, its gradients, and how far its own rounding is from the exact-fp64
reference (the noise floor of :func:`harness.tolerances.reordered`)."""

from __future__ import annotations

import torch

from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError
from harness.compare import logit_stats, tensor_diff
from harness.parity.capture import capture_hf, capture_order, describe_point
from harness.parity.inputs import lm_loss, next_token_labels
from harness.parity.layout import RunLayout
from harness.parity.source import ParitySource


def run_reference(hf: torch.nn.Module, ids: torch.Tensor, cu: torch.Tensor, packed: bool, grads: bool):
    """HF logits and activations ``[b, S, ...]``; a packed row runs each document alone (then concatenated)."""
    acts: dict[str, torch.Tensor] = {}
    with torch.set_grad_enabled(grads):
        if not packed:
            with capture_hf(hf, acts):
                logits = hf(input_ids=ids, use_cache=False).logits
        else:
            per_doc, doc_acts = [], []
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
                store: dict[str, torch.Tensor] = {}
                with capture_hf(hf, store):
                    per_doc.append(hf(input_ids=ids[:, start:end], use_cache=False).logits)
                doc_acts.append(store)
            logits = torch.cat(per_doc, dim=1)
            acts = {k: torch.cat([d[k] for d in doc_acts], dim=1) for k in doc_acts[0]}
        if grads:
            lm_loss(logits, next_token_labels(ids, cu)).backward()
    acts["logits"] = logits.detach()
    return logits, acts


def reference_noise(
    source: ParitySource,
    dtype: torch.dtype,
    seed: int,
    ids: torch.Tensor,
    cu: torch.Tensor,
    layout: RunLayout,
    ref_acts: dict[str, torch.Tensor],
) -> tuple[float, float, float]:
    """How far the ``dtype`` reference is from the exact-fp64 one on these inputs: logits max abs,
    worst scaled activation error, mean KL (see ``tolerances.reordered``)."""
    from harness.reference import build_reference_model

    exact = build_reference_model(source.hf_config, torch.float64, seed=seed, weights=source.weights)
    _, exact_acts = run_reference(exact, ids, cu, bool(layout.packed), grads=False)
    logits = tensor_diff(ref_acts["logits"], exact_acts["logits"]).max_abs
    acts = max(tensor_diff(ref_acts[k], exact_acts[k]).scaled for k in exact_acts if k != "logits")
    kl = logit_stats(ref_acts["logits"], exact_acts["logits"]).kl_mean
    return logits, acts, kl


def require_finite_reference(
    spec: Gemma4TextSpec, ref_acts: dict[str, torch.Tensor], label: str, dtype: torch.dtype
) -> None:
    """The HF reference must be finite everywhere: if HF itself overflows or produces NaN on these weights
    and inputs, there is nothing to compare the port with, and blaming the port would be wrong. Raises
    :class:`InvalidInputError` naming the first non-finite capture point."""
    for name in capture_order(spec):
        t = ref_acts.get(name)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise InvalidInputError(
                f"{label}: the HF reference itself is non-finite at {describe_point(spec, name)} in "
                f"{str(dtype).removeprefix('torch.')} (NaN/inf from the weights or config, e.g. values that "
                "overflow this dtype); not a port failure, fix the input"
            )


def reference_grads(
    hf: torch.nn.Module, hf_weights: dict[str, torch.Tensor], spec: Gemma4TextSpec, label: str
) -> dict[str, torch.Tensor]:
    """The reference's gradients after :func:`run_reference` with ``grads=True``, as TP = 1 Megatron tensors
    (zeros for a weight HF did not use); a non-finite one is invalid input (the loss overflows)."""
    from gemma4.conversion.mapping import hf_to_mcore

    named = reference_hf_grads(hf, hf_weights, label)
    hf_grads = {k: named[k] if k in named else torch.zeros_like(v) for k, v in hf_weights.items()}
    return hf_to_mcore(hf_grads, spec)


def reference_hf_grads(
    hf: torch.nn.Module, hf_weights: dict[str, torch.Tensor], label: str
) -> dict[str, torch.Tensor]:
    """The reference's gradients after :func:`run_reference` with ``grads=True`` under HF names (relative to
    ``model.``, the keys of ``hf_weights``), for the HF **parameters** only (buffers such as ``layer_scalar``
    have none); what an implementation's HF-named gradients (``RankResult.hf_grads``) are compared with. A
    parameter HF did not use gets zeros; a non-finite gradient is invalid input (the loss overflows)."""
    named = dict(hf.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for k, v in hf_weights.items():
        param = named.get(("" if k.startswith("lm_head.") else "model.") + k)
        if param is None:
            continue
        out[k] = param.grad if param.grad is not None else torch.zeros_like(v)
        if not bool(torch.isfinite(out[k]).all()):
            raise InvalidInputError(
                f"{label}: the HF reference's gradient of {k!r} is non-finite; the loss overflows "
                "on this input (not a port failure)"
            )
    return out

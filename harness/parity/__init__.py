"""HF vs Megatron parity of a whole Gemma 4 text model, as a pipeline; the modules follow the data flow:

* :mod:`~harness.parity.source`: what is compared (preset, config.json or checkpoint; run dtypes)
* :mod:`~harness.parity.layout`: how our side is laid out (TP/CP/EP/SP, packed), its refusals, TP padding
* :mod:`~harness.parity.inputs`: token ids, document boundaries, labels, CP/SP padding, the loss
* :mod:`~harness.parity.capture`: the capture points and the hooks that record them on both sides
* :mod:`~harness.parity.reference_side`: HF on the inputs, its gradients and its rounding noise
* :mod:`~harness.parity.impl`: the model side's interface (:class:`ImplementationUnderTest`, :data:`OURS`)
* :mod:`~harness.parity.megatron_side`: our Megatron model per rank, and the ranks' pieces assembled
* :mod:`~harness.parity.judge`: the one judge (errors + tolerance -> failures, first divergence)
* :mod:`~harness.parity.result`: :class:`ParityResult` (JSON form, summary, tensors)
* :mod:`~harness.parity.run`: :func:`run_parity`, the steps in order

Names are re-exported lazily (``from harness.parity import run_parity``): importing the package, or
:mod:`harness.parity.layout` for the CLI's help texts, does not import torch. The judge function itself is
:func:`harness.parity.judge.judge` (the package attribute ``judge`` is the module).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DTYPES": "source",
    "ParitySource": "source",
    "materialize": "source",
    "resolve_source": "source",
    "RunLayout": "layout",
    "pad_weights": "layout",
    "tp_padding": "layout",
    "validate_layout": "layout",
    "SequencePadding": "inputs",
    "cu_seqlens_of": "inputs",
    "lm_loss": "inputs",
    "make_inputs": "inputs",
    "next_token_labels": "inputs",
    "pad_sequences": "inputs",
    "capture_hf": "capture",
    "capture_mcore": "capture",
    "capture_order": "capture",
    "describe_point": "capture",
    "reference_grads": "reference_side",
    "reference_noise": "reference_side",
    "require_finite_reference": "reference_side",
    "run_reference": "reference_side",
    "ImplementationUnderTest": "impl",
    "OURS": "impl",
    "RankResult": "impl",
    "finalize_grads": "megatron_side",
    "run_megatron_rank": "megatron_side",
    "GradientErrors": "judge",
    "Verdict": "judge",
    "point_diffs": "judge",
    "ParityResult": "result",
    "ParityTensors": "result",
    "run_parity": "run",
}

_SUBMODULES = frozenset(_EXPORTS.values()) | {"run"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``harness.parity.megatron_side`` without importing it first
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)

"""Weight sync (Megatron -> SGLang): slime's ``convert_<model>_to_hf(args, name, param)`` for Gemma 4.

slime gathers each parameter over TP (and EP, with global expert indices) and calls the converter of the
model once per parameter; the converter returns the HF ``(name, tensor)`` pairs SGLang loads. Ours,
:func:`convert_gemma4_to_hf`, reads the model geometry from ``args`` (below) and hands the parameter to
:func:`gemma4.conversion.streaming.param_to_hf`, so weight sync is the same code the conversion tests check
against HF's state dict. MoE experts come back one per call as ``layers.{L}.experts.{e}.gate_up_proj`` /
``down_proj`` slices (see that module's docstring; :class:`ExpertStacker` re-fuses them).

**args contract** (a ``types.SimpleNamespace`` is enough); the per-layer geometry comes from the first of:

1. ``args.gemma4_text_spec``: a :class:`gemma4.config.Gemma4TextSpec`;
2. ``args.hf_config``: a ``Gemma4TextConfig`` / ``Gemma4Config``, a ``config.json`` dict, or a path;
3. ``args.hf_checkpoint``: slime's ``--hf-checkpoint`` directory (its ``config.json`` is parsed once and
   cached on ``args``; re-read if the file changes).

Output prefix: ``args.gemma4_hf_prefix`` if set (``"model."`` or ``"model.language_model."``); otherwise
the prefix that config implies (:func:`gemma4.config.text_spec_and_prefix`: ``model.language_model.`` for a
multimodal ``gemma4`` config, ``model_type: gemma4`` or ``architectures`` naming
``Gemma4ForConditionalGeneration``; else ``model.``, CausalLM, the default).

Dispatch by model name: :func:`get_converter` knows the exact names in :data:`MODEL_NAMES` (any case);
:func:`convert_to_hf` has the shape of slime's dispatcher, ``convert_to_hf(args, model_name, name, param,
quantization_config=None)``, and sends every Gemma 4 model name (any config or class name containing
``gemma4``) to our converter; :func:`gemma4.slime.hooks.install` routes slime's own dispatcher through it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemma4.config import (
    HF_CAUSAL_LM_PREFIX,
    HF_CONDITIONAL_GENERATION_PREFIX,
    Gemma4TextSpec,
    config_json_path,
    text_spec_and_prefix,
)
from gemma4.conversion.streaming import ExpertStacker, param_to_hf
from gemma4.errors import InvalidInputError

__all__ = [
    "MODEL_NAMES",
    "ExpertStacker",
    "convert_gemma4_to_hf",
    "convert_to_hf",
    "dispatcher_with_gemma4",
    "get_converter",
    "is_gemma4_model_name",
    "resolve_target",
]

#: The model names :func:`get_converter` (and slime's ``_LOADERS``, :data:`gemma4.slime.loader.LOADERS`) know.
MODEL_NAMES = (
    "gemma4",
    "gemma-4",
    "gemma4_text",
    "gemma4forcausallm",
    "gemma4forconditionalgeneration",
    "gemma4config",
    "gemma4textconfig",
)


def _stamp(source: Any) -> Any:
    """What identifies a config source's content: a path's config.json (mtime, size), else the object."""
    if isinstance(source, (str, Path)):
        path = config_json_path(source)
        try:
            st = path.stat()
        except OSError:
            return (str(path), None)
        return (str(path.resolve()), st.st_mtime_ns, st.st_size)
    return ("object", id(source))


def resolve_target(args: Any) -> tuple[Gemma4TextSpec, str]:
    """The spec and the HF name prefix ``args`` describes (see the module docstring for the contract).

    The parsed config is cached on ``args`` itself (slime calls this once per tensor), keyed by the source
    object and, for a path, by its config.json's mtime and size, so a rewritten config is re-read.
    """
    spec = getattr(args, "gemma4_text_spec", None)
    prefix = None
    if spec is None:
        source = getattr(args, "hf_config", None)
        if source is None:
            source = getattr(args, "hf_checkpoint", None)
        if source is None:
            raise InvalidInputError(
                "convert_gemma4_to_hf: args has none of 'gemma4_text_spec', 'hf_config', 'hf_checkpoint'"
            )
        stamp = _stamp(source)
        cached = getattr(args, "_gemma4_resolved", None)
        if cached is not None and cached[0] is source and cached[1] == stamp:
            spec, prefix = cached[2]
        else:
            spec, prefix = text_spec_and_prefix(source)
            try:
                args._gemma4_resolved = (source, stamp, (spec, prefix))
            except AttributeError:  # an args object that takes no attributes: parse every call
                pass
    override = getattr(args, "gemma4_hf_prefix", None)
    if override is not None:
        if override not in (HF_CAUSAL_LM_PREFIX, HF_CONDITIONAL_GENERATION_PREFIX):
            raise InvalidInputError(
                f"args.gemma4_hf_prefix is {override!r}; expected 'model.' or 'model.language_model.'"
            )
        prefix = override
    return spec, prefix or HF_CAUSAL_LM_PREFIX


def convert_gemma4_to_hf(args: Any, name: str, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One gathered Megatron parameter -> its HF ``(name, tensor)`` pairs, the geometry from ``args``."""
    spec, prefix = resolve_target(args)
    return param_to_hf(name, param, spec, prefix)


def get_converter(model_name: str) -> Callable[[Any, str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """The converter for ``model_name`` (``gemma4``, ``gemma-4``, ``gemma4_text``, HF class names; any case)."""
    if not isinstance(model_name, str) or model_name.strip().lower() not in MODEL_NAMES:
        raise InvalidInputError(
            f"no Megatron->HF converter for model {model_name!r}; this one handles {list(MODEL_NAMES)}"
        )
    return convert_gemma4_to_hf


def is_gemma4_model_name(model_name: Any) -> bool:
    """True for slime's model names of Gemma 4 (``gemma4config``, ``gemma4textconfig``, ``gemma-4``, ...)."""
    if not isinstance(model_name, str):
        return False
    return "gemma4" in model_name.lower().replace("-", "").replace("_", "")


def convert_to_hf(
    args: Any, model_name: str, name: str, param: Any, quantization_config: Any = None, *, fallback=None
) -> list[tuple[str, Any]]:
    """slime's dispatcher shape. Gemma 4 names -> :func:`convert_gemma4_to_hf`; other names -> ``fallback``
    (slime's original dispatcher when installed by the hooks) or an error naming the model."""
    if is_gemma4_model_name(model_name):
        if quantization_config is not None:
            raise InvalidInputError(
                f"weight sync of {name!r}: quantized export ({type(quantization_config).__name__}) is not "
                "supported for Gemma 4"
            )
        return convert_gemma4_to_hf(args, name, param)
    if fallback is not None:
        return fallback(args, model_name, name, param, quantization_config)
    raise InvalidInputError(f"no Megatron->HF converter for model {model_name!r} here (Gemma 4 only)")


def dispatcher_with_gemma4(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap slime's ``convert_to_hf`` so that Gemma 4 models use our converter and others the original."""

    def convert_to_hf_with_gemma4(args, model_name, name, param, *rest, **kwargs):
        if is_gemma4_model_name(model_name):
            quantization = rest[0] if rest else kwargs.get("quantization_config")
            return convert_to_hf(args, model_name, name, param, quantization)
        return original(args, model_name, name, param, *rest, **kwargs)

    convert_to_hf_with_gemma4.__wrapped__ = original
    convert_to_hf_with_gemma4.gemma4_hook = True
    return convert_to_hf_with_gemma4

r"""Weight sync (Megatron -> SGLang): slime's ``convert_<model>_to_hf(args, name, param)`` for Gemma 4.

slime gathers each parameter over TP (and EP; expert indices below) and calls the converter of the
model once per parameter; the converter returns the HF ``(name, tensor)`` pairs SGLang loads. Ours,
:func:`convert_gemma4_to_hf`, reads the model geometry from ``args`` (below) and hands the parameter to
:func:`gemma4.conversion.streaming.param_to_hf`, so weight sync is the same code the conversion tests check
against HF's state dict. MoE experts come back one per call under the per-expert names SGLang 0.5.23 routes,
``layers.{L}.experts.{e}.gate_proj.weight`` / ``up_proj.weight`` (from ``linear_fc1``) and
``down_proj.weight`` (from ``linear_fc2``) (see that module's docstring; :class:`ExpertStacker` re-fuses
them into HF's checkpoint format).

**Expert parallelism (slime 624b824a8)**: ``update_weight/common.py:_named_params_and_buffers_global``
(line 171; offset ``ep_rank * num_experts // ep_size`` at line 182) adds the EP offset only to names
matching ``mlp\.experts\.(.+)\.(weight|bias)(\d+)`` (lines 224-230, "hardcoded for te grouped matmul");
our SequentialMLP's ``mlp.experts.local_experts.{i}.linear_fc1.weight`` does not match and is yielded with
the local ``i`` (line 232). Then ``update_weight_from_distributed.py:_ep_gather_and_convert`` (line 205)
all-gathers names and tensors over the EP group and calls ``convert_to_hf`` on every rank's list (line 238),
so rank 1's expert ``i`` arrives under the same name as rank 0's; ``hf_weight_iterator_direct.py:
_get_megatron_local_param_infos`` (line 171) unions names over EP (``if name not in param_infos``, line
219), so each EP rank keeps its own entry for expert ``i`` with itself as the source rank and both
broadcast as root (lines 110-118): the mismatched collective hangs (line 121; seen on gloo,
``tests/unit/gemma4/slime/test_slime_update_weight_ranks.py``). The converter cannot tell the ranks apart from the name, so:
:func:`with_global_expert_names` wraps slime's ``_named_params_and_buffers_global`` to rename SequentialMLP
experts to the TE grouped form with the global index (``…mlp.experts.linear_fc1.weight{ep_rank * E/ep +
i}``, what slime's own rule produces for TE), and :func:`convert_gemma4_to_hf` refuses a ``local_experts``
name when ``args.expert_model_parallel_size > 1`` (wrapper not installed: a silent misplacement otherwise).

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

import os
import re
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
    "slime_global_expert_name",
    "with_global_expert_names",
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
    """One gathered Megatron parameter -> its HF ``(name, tensor)`` pairs, the geometry from ``args``
    (``args.expert_model_parallel_size`` > 1 refuses rank-local ``local_experts`` names)."""
    spec, prefix = resolve_target(args)
    ep_size = int(getattr(args, "expert_model_parallel_size", None) or 1)
    check_router_scale(args, name, param)
    return param_to_hf(name, param, spec, prefix, ep_size=ep_size)


SGLANG_ROUTER_SCALE_FOLD = (
    "SGLang 0.5.23 folds router.scale * H^-0.5 into its router norm once, at first use "
    "(sglang/srt/models/gemma4_causal.py Gemma4Router.fuse_scale, lines 203-212), and never re-applies it"
)
ALLOW_ROUTER_SCALE_UPDATE_ENV = "GEMMA4_ALLOW_ROUTER_SCALE_UPDATE"
_ROUTER_SCALE = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.mlp\.router\.scale$")


def check_router_scale(args: Any, name: str, param: torch.Tensor) -> None:
    """Refuse a ``router.scale`` that differs from its value at the first sync (per layer, kept on ``args``):
    SGLang would keep the folded first value. ``$GEMMA4_ALLOW_ROUTER_SCALE_UPDATE=1`` switches the check off
    (for an engine that re-folds ``router.scale`` on every weight update)."""
    m = _ROUTER_SCALE.search(name)
    if m is None or os.environ.get(ALLOW_ROUTER_SCALE_UPDATE_ENV, "0") not in ("", "0"):
        return
    first = getattr(args, "_gemma4_router_scale_at_first_sync", None)
    if first is None:
        first = {}
        args._gemma4_router_scale_at_first_sync = first
    layer = int(m.group(1))
    value = param.detach().to("cpu", copy=True)
    if layer not in first:
        first[layer] = value
        return
    if not torch.equal(first[layer], value):
        raise InvalidInputError(
            f"weight sync: {name} (router.scale of layer {layer}) changed since the first sync; "
            f"{SGLANG_ROUTER_SCALE_FOLD}, so the rollouts would keep the old value. Keep router.scale frozen "
            f"(the default of gemma4.slime.model_provider; unset GEMMA4_TRAIN_ROUTER_SCALE), or set "
            f"{ALLOW_ROUTER_SCALE_UPDATE_ENV}=1 if your engine re-applies it"
        )


_SEQUENTIAL_EXPERT = re.compile(
    r"^(?P<head>(?:module\.)*(?:language_model\.)?decoder\.layers\.\d+\.mlp\.experts)"
    r"\.local_experts\.(?P<i>\d+)\.(?P<fc>linear_fc[12])\.weight$"
)


def slime_global_expert_name(name: str, ep_rank: int, ep_size: int, num_experts: int) -> str:
    """A SequentialMLP expert name with its rank-local index ``i`` -> TE's grouped name with the global index
    ``ep_rank * num_experts // ep_size + i`` (the form slime itself makes global); other names unchanged."""
    m = _SEQUENTIAL_EXPERT.match(name)
    if m is None:
        return name
    if num_experts % ep_size:
        raise InvalidInputError(f"{num_experts} experts do not split over expert-parallel size {ep_size}")
    e = ep_rank * (num_experts // ep_size) + int(m.group("i"))
    return f"{m.group('head')}.{m.group('fc')}.weight{e}"


def with_global_expert_names(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap slime's ``update_weight.common._named_params_and_buffers_global(args, model)`` so SequentialMLP
    experts come out under :func:`slime_global_expert_name` (EP rank and size from Megatron's
    ``parallel_state``, ``num_experts`` from ``args.num_experts``). Install by assigning the result back to
    that module attribute: ``named_params_and_buffers`` looks it up at call time, so every slime path that
    names parameters (tensor/distributed weight sync, the HF checkpoint saver) sees global indices."""

    def named_params_and_buffers_global_experts(args, model, *rest, **kwargs):
        from megatron.core import parallel_state as mpu

        ep_size = mpu.get_expert_model_parallel_world_size()
        ep_rank = mpu.get_expert_model_parallel_rank()
        num_experts = int(getattr(args, "num_experts", None) or 0)
        for name, tensor in original(args, model, *rest, **kwargs):
            if num_experts:
                name = slime_global_expert_name(name, ep_rank, ep_size, num_experts)
            yield name, tensor

    named_params_and_buffers_global_experts.__wrapped__ = original
    named_params_and_buffers_global_experts.gemma4_hook = True
    return named_params_and_buffers_global_experts


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

"""slime's streaming Megatron -> HF converter for Gemma 4: ``convert_gemma4_to_hf(args, name, param)``.

RL training pushes Megatron weights into SGLang every step. slime gathers each parameter across TP (and
EP, renaming experts to their global index) and calls ``convert_<model>_to_hf(args, name, param)`` once per
parameter; the converter returns the HF ``(name, tensor)`` pairs it stands for. This one is driven by the
same table as every other direction (:mod:`gemma4.conversion.mapping`), so it cannot disagree with export.

**Names in**: any number of leading ``module.`` (DDP / Float16Module wrappers), then Megatron's global
names: ``embedding.word_embeddings.weight``, ``decoder.layers.{L}.…``, ``decoder.final_layernorm.weight``,
``output_layer.weight``; experts as ``decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``
or TE's grouped form ``decoder.layers.{L}.mlp.experts.linear_fc{1,2}.weight{e}``, with ``e`` global.
``_extra_state`` entries return ``[]``; an unknown name raises ``InvalidInputError`` naming it.

**Tensors in**: full (TP-gathered) tensors. Out: views or fresh tensors of the same dtype (no cast).

**args contract** (a ``types.SimpleNamespace`` is enough); the per-layer geometry comes from the first of:

1. ``args.gemma4_text_spec``: a :class:`gemma4.config.Gemma4TextSpec`;
2. ``args.hf_config``: a ``Gemma4TextConfig`` / ``Gemma4Config``, a ``config.json`` dict, or a path;
3. ``args.hf_checkpoint``: slime's ``--hf-checkpoint`` directory (its ``config.json`` is parsed once and
   cached on ``args``; re-read if the file changes).

Output prefix: ``args.gemma4_hf_prefix`` if set (``"model."`` or ``"model.language_model."``); otherwise
``model.language_model.`` when that config is a multimodal ``gemma4`` config (``model_type: gemma4`` or
``architectures`` naming ``Gemma4ForConditionalGeneration``), else ``model.`` (CausalLM, the default).

**Tied embeddings**: ``embedding.word_embeddings.weight`` -> ``embed_tokens.weight`` exactly once; an
``output_layer.weight`` (pipeline-parallel copies of the tied head) returns ``[]``, never ``lm_head.weight``.
Untied: ``output_layer.weight`` -> ``lm_head.weight`` (absolute name). **K=V layers** emit q/k only;
KV-shared (reuse) layers emit ``q_proj`` only; PLE tensors map one to one (all from the same table).

**Experts plan** (does not need all experts of a layer in one call): HF stores a layer's experts fused
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]); each expert arrives in its own call,
in any order, possibly from different EP ranks. Each call returns that expert's slice under a per-expert
name, ``{prefix}layers.{L}.experts.{e}.gate_up_proj`` ([2I, H] = ``[gate; up]`` = ``gate_up_proj[e]``) and
``{prefix}layers.{L}.experts.{e}.down_proj`` ([H, I] = ``down_proj[e]``), which an inference engine's
loader writes into row ``e`` of its fused parameter (SGLang's FusedMoE ``weight_loader`` takes an
``expert_id``). Where a consumer needs the fused HF tensor instead (an HF export), :class:`ExpertStacker`
buffers one layer's slices and emits ``experts.gate_up_proj`` / ``experts.down_proj`` once all ``E``
have arrived (memory: one layer's experts of one kind).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemma4.config import Gemma4TextSpec, hf_text_config_from_any, hf_text_config_from_dict, text_spec_from_hf
from gemma4.conversion import mapping
from gemma4.conversion.safetensors_io import read_checkpoint_json
from gemma4.errors import InvalidInputError

MODEL_NAMES = (
    "gemma4",
    "gemma-4",
    "gemma4_text",
    "gemma4forcausallm",
    "gemma4forconditionalgeneration",
    "gemma4config",
    "gemma4textconfig",
)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_GROUPED_EXPERT = re.compile(r"^(mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


def strip_module_prefixes(name: str) -> str:
    """Remove every leading ``module.`` (wrapper) prefix."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _is_conditional_generation(raw: dict[str, Any]) -> bool:
    archs = raw.get("architectures") or []
    return raw.get("model_type") == "gemma4" or "Gemma4ForConditionalGeneration" in archs


def _from_config_source(obj: Any) -> tuple[Gemma4TextSpec, str]:
    from transformers import Gemma4Config

    if isinstance(obj, (str, Path)):
        path = Path(obj)
        path = path / "config.json" if path.is_dir() else path
        raw = read_checkpoint_json(path, "config.json")
        hf_config = hf_text_config_from_dict(raw, source=str(path))
        return text_spec_from_hf(hf_config), _prefix(_is_conditional_generation(raw))
    if isinstance(obj, dict):
        return text_spec_from_hf(hf_text_config_from_any(obj)), _prefix(_is_conditional_generation(obj))
    cg = isinstance(obj, Gemma4Config)
    return text_spec_from_hf(hf_text_config_from_any(obj)), _prefix(cg)


def _prefix(conditional_generation: bool) -> str:
    return mapping.HF_CONDITIONAL_GENERATION_PREFIX if conditional_generation else mapping.HF_CAUSAL_LM_PREFIX


def _stamp(source: Any) -> Any:
    """What identifies a config source's content: a path's config.json (mtime, size), else the object."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
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
            spec, prefix = _from_config_source(source)
            try:
                args._gemma4_resolved = (source, stamp, (spec, prefix))
            except AttributeError:  # an args object that takes no attributes: parse every call
                pass
    override = getattr(args, "gemma4_hf_prefix", None)
    if override is not None:
        if override not in (mapping.HF_CAUSAL_LM_PREFIX, mapping.HF_CONDITIONAL_GENERATION_PREFIX):
            raise InvalidInputError(
                f"args.gemma4_hf_prefix is {override!r}; expected 'model.' or 'model.language_model.'"
            )
        prefix = override
    return spec, prefix or mapping.HF_CAUSAL_LM_PREFIX


def _full(prefix: str, name: str) -> str:
    return name if name == "lm_head.weight" else prefix + name


def expert_hf_name(prefix: str, layer: int, expert: int, kind: str) -> str:
    """Per-expert HF slice name (``kind`` is ``gate_up_proj`` or ``down_proj``)."""
    return f"{prefix}layers.{layer}.experts.{expert}.{kind}"


def convert_gemma4_to_hf(args: Any, name: str, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One gathered Megatron parameter -> its HF ``(name, tensor)`` pairs (see the module docstring)."""
    spec, prefix = resolve_target(args)
    name = strip_module_prefixes(name)
    if name.endswith("_extra_state"):
        return []
    m = _LAYER.match(name)
    if m is None:
        for rule in mapping.global_rules(spec):
            if rule.mcore == name:
                if rule.tp_layout == mapping.VOCAB:
                    param = _unpad_vocab(name, param, mapping.hf_shape(rule.hf[0], spec, None)[0])
                return _checked(
                    spec, None, [(n, t) for n, t in mapping.rule_to_hf(rule, param, spec, None)], prefix
                )
        if name == mapping.UNTIED_HEAD_RULE.mcore and spec.tie_word_embeddings:
            return []  # the tied head is embed_tokens, emitted once with the embedding
        raise InvalidInputError(f"convert_gemma4_to_hf: no HF mapping for Megatron parameter {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= spec.num_layers:
        raise InvalidInputError(
            f"convert_gemma4_to_hf: parameter {name!r} names layer {layer}; the model has {spec.num_layers}"
        )
    grouped = _GROUPED_EXPERT.match(rest) or _LOCAL_EXPERT.match(rest)
    if grouped is not None:
        if grouped.re is _GROUPED_EXPERT:
            fc, expert = grouped.group(2), int(grouped.group(3))
        else:
            expert, fc = int(grouped.group(1)), grouped.group(2)
        template = f"decoder.layers.{layer}.mlp.experts.local_experts.{{e}}.{fc}.weight"
        for rule in mapping._layer_rules(spec, layer):
            if rule.is_expert and rule.mcore == template:
                kind = rule.hf[0].rsplit(".", 1)[-1]
                return [(expert_hf_name(prefix, layer, expert, kind), param)]
        raise InvalidInputError(
            f"convert_gemma4_to_hf: {name!r} is an expert, but layer {layer} has no experts"
        )
    for rule in mapping._layer_rules(spec, layer):
        if rule.mcore == name:
            return _checked(spec, layer, mapping.rule_to_hf(rule, param, spec, layer), prefix)
    raise InvalidInputError(f"convert_gemma4_to_hf: no HF mapping for Megatron parameter {name!r}")


def _unpad_vocab(name: str, param: torch.Tensor, vocab: int) -> torch.Tensor:
    """Megatron pads vocabularies to a multiple of TP x make-vocab-size-divisible-by; HF has exactly ``vocab``
    rows. Cut the padding; fewer rows than HF's is an error."""
    if param.shape[0] < vocab:
        raise InvalidInputError(
            f"convert_gemma4_to_hf: {name!r} has {param.shape[0]} rows, fewer than the vocabulary ({vocab})"
        )
    return param[:vocab]


def _checked(
    spec: Gemma4TextSpec, layer: int | None, pairs: list[tuple[str, torch.Tensor]], prefix: str
) -> list[tuple[str, torch.Tensor]]:
    """Every emitted tensor must have the shape HF expects from the config (a wrong slice never reaches the
    rollout engine)."""
    out = []
    for hf_name, t in pairs:
        want = mapping.hf_shape(hf_name, spec, layer)
        if tuple(t.shape) != want:
            raise InvalidInputError(
                f"convert_gemma4_to_hf: {_full(prefix, hf_name)!r} would have shape {list(t.shape)}; the config "
                f"implies {list(want)}"
            )
        out.append((_full(prefix, hf_name), t))
    return out


class ExpertStacker:
    """Buffers per-expert slices of one layer and emits the fused HF tensor once all experts arrived."""

    _SLICE = re.compile(r"^(?P<head>.*layers\.\d+\.experts)\.(?P<e>\d+)\.(?P<kind>gate_up_proj|down_proj)$")

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.pending: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Pass non-expert pairs through; buffer expert slices; return the fused tensor when complete."""
        m = self._SLICE.match(hf_name)
        if m is None:
            return [(hf_name, tensor)]
        fused = f"{m.group('head')}.{m.group('kind')}"
        slot = self.pending.setdefault(fused, {})
        e = int(m.group("e"))
        if not 0 <= e < self.num_experts or e in slot:
            raise InvalidInputError(
                f"ExpertStacker: expert {e} of {fused!r} is out of range or arrived twice"
            )
        slot[e] = tensor
        if len(slot) < self.num_experts:
            return []
        del self.pending[fused]
        return [(fused, mapping.stack_experts([slot[i] for i in range(self.num_experts)]))]


def get_converter(model_name: str) -> Callable[[Any, str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """The converter for ``model_name`` (``gemma4``, ``gemma-4``, ``gemma4_text``, HF class names; any case)."""
    if not isinstance(model_name, str) or model_name.strip().lower() not in MODEL_NAMES:
        raise InvalidInputError(
            f"no Megatron->HF converter for model {model_name!r}; this one handles {list(MODEL_NAMES)}"
        )
    return convert_gemma4_to_hf


def convert_to_hf(
    args: Any, model_name: str, name: str, param: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """slime-style dispatch: ``get_converter(model_name)(args, name, param)``."""
    return get_converter(model_name)(args, name, param)

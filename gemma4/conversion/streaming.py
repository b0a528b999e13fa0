"""The per-parameter Megatron -> HF converter for Gemma 4: :func:`param_to_hf(name, param, spec, prefix)`.

RL training pushes Megatron weights into SGLang every step. slime gathers each parameter across TP (and
EP: the expert index must be global, see below) and asks for the HF ``(name, tensor)`` pairs it stands
for; the slime-facing entry point, ``convert_gemma4_to_hf(args, name, param)`` (its ``args`` contract and caching),
is :mod:`gemma4.slime.weight_sync`. This module is the conversion itself, given the model's
:class:`gemma4.config.Gemma4TextSpec` and the HF text-weight prefix (``model.`` or
``model.language_model.``). It is driven by the same table as every other direction
(:mod:`gemma4.conversion.mapping`), so it cannot disagree with export.

**Names in**: any number of leading ``module.`` (DDP / Float16Module wrappers), then Megatron's global
names: ``embedding.word_embeddings.weight``, ``decoder.layers.{L}.…``, ``decoder.final_layernorm.weight``,
``output_layer.weight``; experts as ``decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``
or TE's grouped form ``decoder.layers.{L}.mlp.experts.linear_fc{1,2}.weight{e}`` (``e`` global in both).
``_extra_state`` entries return ``[]``; an unknown name raises ``InvalidInputError`` naming it.

**Tensors in**: full (TP-gathered) tensors. Out: views or fresh tensors of the same dtype (no cast).

**Tied embeddings**: ``embedding.word_embeddings.weight`` -> ``embed_tokens.weight`` exactly once; an
``output_layer.weight`` (pipeline-parallel copies of the tied head) returns ``[]``, never ``lm_head.weight``.
Untied: ``output_layer.weight`` -> ``lm_head.weight`` (absolute name). **K=V layers** emit q/k only;
KV-shared (reuse) layers emit ``q_proj`` only; PLE tensors map one to one (all from the same table).

**Experts plan** (does not need all experts of a layer in one call): HF stores a layer's experts fused
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]); each expert arrives in its own call,
in any order, possibly from different EP ranks. Each call returns that expert's tensors under the per-expert
names SGLang 0.5.23's Gemma 4 ``load_weights`` routes (``FusedMoE.make_expert_params_mapping``:
``experts.{e}.{gate,up,down}_proj.`` -> ``moe.experts.w13_weight`` / ``w2_weight`` slot ``e``), each
``(out, in)`` like an ``nn.Linear`` weight: ``linear_fc1`` [2I, H] = ``[gate; up]`` ->
``{prefix}layers.{L}.experts.{e}.gate_proj.weight`` (rows ``:I``) and ``….up_proj.weight`` (rows ``I:``),
both [I, H]; ``linear_fc2`` -> ``{prefix}layers.{L}.experts.{e}.down_proj.weight`` [H, I]. Any other name
(the former ``experts.{e}.gate_up_proj``) is skipped by SGLang without a word. Where a consumer needs the
fused HF tensors instead (an HF export, HF ``Gemma4ForCausalLM``), :class:`ExpertStacker` buffers one
layer's slices and emits ``experts.gate_up_proj`` / ``experts.down_proj`` once all ``E`` have arrived
(memory: one layer's experts of one kind).

**Expert parallelism**: the expert index in the name must be global. slime makes it global only for TE's
grouped names (``…mlp.experts.linear_fc1.weight{e}``); a SequentialMLP name (``local_experts.{e}``) reaches
us with the rank-local index (see :mod:`gemma4.slime.weight_sync`). ``param_to_hf(..., ep_size=N)`` with
``N > 1`` therefore refuses ``local_experts`` names (``InvalidInputError``) instead of writing expert ``e``
of every EP rank into slot ``e``; the grouped form is taken as global.
"""

from __future__ import annotations

import re

import torch

from gemma4.config import Gemma4TextSpec
from gemma4.conversion import mapping
from gemma4.errors import InvalidInputError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_GROUPED_EXPERT = re.compile(r"^(mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


def strip_module_prefixes(name: str) -> str:
    """Remove every leading ``module.`` (wrapper) prefix."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _full(prefix: str, name: str) -> str:
    return name if name == "lm_head.weight" else prefix + name


#: The per-expert projections SGLang routes, in the order ``linear_fc1`` rows hold them (fc2 is ``down_proj``).
EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")


def expert_hf_name(prefix: str, layer: int, expert: int, kind: str) -> str:
    """Per-expert HF weight name SGLang routes (``kind`` is ``gate_proj``, ``up_proj`` or ``down_proj``)."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"expert kind {kind!r}; expected one of {EXPERT_KINDS}")
    return f"{prefix}layers.{layer}.experts.{expert}.{kind}.weight"


def param_to_hf(
    name: str, param: torch.Tensor, spec: Gemma4TextSpec, prefix: str, ep_size: int = 1
) -> list[tuple[str, torch.Tensor]]:
    """One gathered Megatron parameter -> its HF ``(name, tensor)`` pairs under ``prefix`` (see the module
    docstring). ``ep_size``: the trainer's expert-parallel size; above 1, a ``local_experts.{e}`` name (whose
    index slime leaves rank-local) is refused. Errors are worded for ``convert_gemma4_to_hf``, the slime
    entry point that calls this."""
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
            if ep_size > 1:
                raise InvalidInputError(
                    f"convert_gemma4_to_hf: {name!r} at expert-parallel size {ep_size}: slime leaves the index "
                    "of SequentialMLP 'local_experts.{e}' names rank-local (it makes only TE's grouped "
                    "'linear_fc1.weight{e}' names global), so every EP rank's expert e would land in slot e; "
                    "wrap slime's update_weight.common._named_params_and_buffers_global with "
                    "gemma4.slime.weight_sync.with_global_expert_names (global TE-style names) or run EP 1"
                )
        num_experts = mapping._num_experts(spec)
        if not num_experts:
            raise InvalidInputError(
                f"convert_gemma4_to_hf: {name!r} is an expert, but layer {layer} has no experts"
            )
        if not 0 <= expert < num_experts:
            raise InvalidInputError(
                f"convert_gemma4_to_hf: {name!r} names expert {expert}; the model has {num_experts}"
            )
        fused = f"layers.{layer}.experts.{'gate_up_proj' if fc == 'linear_fc1' else 'down_proj'}"
        want = mapping.hf_shape(fused, spec, layer)[1:]
        if tuple(param.shape) != want:
            raise InvalidInputError(
                f"convert_gemma4_to_hf: expert {name!r} has shape {list(param.shape)}; the config implies "
                f"{list(want)}"
            )
        if fc == "linear_fc2":
            return [(expert_hf_name(prefix, layer, expert, "down_proj"), param)]
        gate, up = param.chunk(2, dim=0)  # linear_fc1 rows are [gate; up], as HF's gate_up_proj[e]
        return [
            (expert_hf_name(prefix, layer, expert, "gate_proj"), gate),
            (expert_hf_name(prefix, layer, expert, "up_proj"), up),
        ]
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
    """Buffers one layer's per-expert tensors (:func:`expert_hf_name`) and emits HF's fused
    ``experts.gate_up_proj`` [E, 2I, H] (``[gate; up]`` per expert) / ``experts.down_proj`` [E, H, I] once all
    ``E`` experts of that tensor arrived. Any other pair passes through."""

    _SLICE = re.compile(
        r"^(?P<head>.*layers\.\d+\.experts)\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj)\.weight$"
    )

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        #: fused HF name -> kind -> expert -> tensor
        self.pending: dict[str, dict[str, dict[int, torch.Tensor]]] = {}

    def add(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Pass non-expert pairs through; buffer expert tensors; return the fused tensor when complete."""
        m = self._SLICE.match(hf_name)
        if m is None:
            return [(hf_name, tensor)]
        kind = m.group("kind")
        fused = f"{m.group('head')}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}"
        kinds = ("down_proj",) if kind == "down_proj" else ("gate_proj", "up_proj")
        slots = self.pending.setdefault(fused, {k: {} for k in kinds})
        slot = slots[kind]
        e = int(m.group("e"))
        if not 0 <= e < self.num_experts or e in slot:
            raise InvalidInputError(
                f"ExpertStacker: {hf_name!r}: expert {e} is out of range or arrived twice"
            )
        slot[e] = tensor
        if any(len(slots[k]) < self.num_experts for k in kinds):
            return []
        del self.pending[fused]
        rows = [torch.cat([slots[k][i] for k in kinds], dim=0) for i in range(self.num_experts)]
        return [(fused, mapping.stack_experts(rows))]

"""HF -> Megatron loading in slime's ``_LOADERS`` shape: ``gemma4_hf_tensor(name, reader, config)``.

slime's mbridge-free loader asks, per Megatron parameter, for the tensor to copy into it. For Gemma 4 the
answer comes from the mapping table (:mod:`gemma4.conversion.mapping`), the one the conversion tests and
the parity harness use:

* ``name``: a Megatron parameter or buffer name, global (TP = 1 layout, global expert index), with any
  number of leading ``module.`` wrappers; experts as ``…mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``
  or Transformer Engine's grouped ``…mlp.experts.linear_fc{1,2}.weight{e}``. ``…_extra_state`` -> ``None``.
* ``reader``: where HF tensors come from, by their full checkpoint name: a mapping (``reader[name]``), a
  ``safetensors.safe_open`` handle or anything with ``get_tensor(name)``, or a callable ``reader(name)``.
* ``config``: the HF config (``Gemma4TextConfig`` / ``Gemma4Config`` object, ``config.json`` dict or path) or
  a :class:`gemma4.config.Gemma4TextSpec`. The checkpoint prefix (``model.`` or ``model.language_model.``)
  is taken from the reader's names when it lists them (``keys()``), else from the config.

Returns the **full TP = 1 tensor** (``linear_qkv`` per-group interleaved without a V slot on K=V layers,
``linear_fc1 = [gate; up]``, one expert's slice). Cutting it for a TP rank is the caller's job, with
Megatron's own parameter metadata (:func:`gemma4.parallel.shard_like`). A layer's fused expert tensor is read
once and kept until another HF tensor is asked for (memory: one fused tensor).

slime's loader API (commit 624b824a8, ``slime/backends/megatron_utils/hf_to_megatron/``): the callable
signature ``(name, reader, config)`` and the full-tensor return value; :data:`LOADERS` maps Gemma 4 model
names (slime looks up ``config.model_type``) to this function. slime walks only parameters and
``expert_bias`` buffers, so ``layer_scalar`` is loaded by :func:`with_gemma4_buffers` (installed over
slime's ``load_hf_weights`` by :func:`gemma4.slime.hooks.install`). Tested against slime's own code in
``tests/unit/gemma4/slime/test_slime_contract.py``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from gemma4.config import Gemma4TextSpec, prefix_from_names, text_spec_and_prefix
from gemma4.conversion import mapping
from gemma4.conversion.streaming import strip_module_prefixes
from gemma4.errors import InvalidInputError
from gemma4.slime.weight_sync import MODEL_NAMES

_GROUPED = re.compile(
    r"^(?P<head>decoder\.layers\.\d+\.mlp\.experts)\.(?P<fc>linear_fc[12])\.weight(?P<e>\d+)$"
)
_LOCAL = re.compile(
    r"^(?P<head>decoder\.layers\.\d+\.mlp\.experts\.local_experts)\.(?P<e>\d+)\.(?P<rest>.+)$"
)
_INDEX: dict[str, dict[str, tuple[mapping.Rule, int | None]]] = {}
_LAST: list[Any] = [None, None, None]  # reader, HF name, tensor of the last fused-expert read


def _spec_key(spec: Gemma4TextSpec) -> str:
    return json.dumps(spec.to_json_dict(), sort_keys=True, default=str)


def rule_index(spec: Gemma4TextSpec) -> dict[str, tuple[mapping.Rule, int | None]]:
    """Megatron name (expert names with ``{e}``) -> (rule, layer), from the table, cached per spec."""
    key = _spec_key(spec)
    if key not in _INDEX:
        _INDEX[key] = {rule.mcore: (rule, layer) for rule, layer in mapping.bound_rules(spec)}
    return _INDEX[key]


def _names(reader: Any) -> list[str] | None:
    keys = getattr(reader, "keys", None)
    if callable(keys):
        try:
            return [str(k) for k in keys()]
        except Exception:  # noqa: BLE001 - a reader that cannot list its names: use the config
            return None
    return None


def resolve(config: Any, reader: Any) -> tuple[Gemma4TextSpec, str]:
    """The spec and the checkpoint prefix for ``config`` and ``reader`` (see the module docstring). A
    ``config.json`` path is read once, strictly (:func:`gemma4.config.read_hf_config`); the prefix comes
    from the reader's names when it lists them (:func:`gemma4.config.prefix_from_names`), else from the
    config (:func:`gemma4.config.text_spec_and_prefix`)."""
    spec, prefix = text_spec_and_prefix(config)
    names = _names(reader)
    return spec, (prefix_from_names(names) if names is not None else prefix)


def _read(reader: Any, full_name: str, keep: bool = False) -> torch.Tensor:
    if _LAST[0] is reader and _LAST[1] == full_name:
        return _LAST[2]
    try:
        if isinstance(reader, Mapping):
            tensor = reader[full_name]
        elif callable(getattr(reader, "get_tensor", None)):
            tensor = reader.get_tensor(full_name)
        elif callable(reader):
            tensor = reader(full_name)
        else:
            raise InvalidInputError(
                f"reader of type {type(reader).__name__} is neither a mapping, nor has get_tensor(), nor is callable"
            )
    except (KeyError, FileNotFoundError) as exc:
        raise InvalidInputError(f"HF tensor {full_name!r} is missing from the checkpoint ({exc})") from exc
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(f"HF tensor {full_name!r}: the reader returned {type(tensor).__name__}")
    _LAST[:] = [reader, full_name, tensor] if keep else [None, None, None]
    return tensor


def gemma4_hf_tensor(name: str, reader: Any, config: Any) -> torch.Tensor | None:
    """The Megatron tensor (TP = 1) for parameter ``name``, read from the HF checkpoint through ``reader``."""
    spec, prefix = resolve(config, reader)
    mcore = strip_module_prefixes(name)
    if mcore.endswith("_extra_state"):
        return None
    grouped = _GROUPED.match(mcore)
    if grouped:
        mcore = f"{grouped['head']}.local_experts.{grouped['e']}.{grouped['fc']}.weight"
    expert = None
    local = _LOCAL.match(mcore)
    if local:
        expert = int(local["e"])
        mcore = f"{local['head']}.{{e}}.{local['rest']}"
    index = rule_index(spec)
    if mcore == mapping.UNTIED_HEAD_RULE.mcore and spec.tie_word_embeddings:
        mcore = mapping.GLOBAL_RULES[0].mcore  # pipeline-parallel copy of the tied head = the embedding
    if mcore not in index:
        raise InvalidInputError(f"gemma4_hf_tensor: no HF source for Megatron parameter {name!r}")
    rule, layer = index[mcore]
    tensors = [_read(reader, n if n == "lm_head.weight" else prefix + n, rule.is_expert) for n in rule.hf]
    out = mapping.rule_to_mcore(rule, tensors, spec, layer)
    if rule.is_expert:
        if expert is None or not 0 <= expert < len(out):
            raise InvalidInputError(
                f"gemma4_hf_tensor: {name!r} names expert {expert}; the layer has {len(out)}"
            )
        return out[expert]
    return out


#: slime looks its loader up by ``AutoConfig.from_pretrained(dir).model_type``; the 12B's is ``gemma4_unified``.
LOADERS = {model_name: gemma4_hf_tensor for model_name in (*MODEL_NAMES, "gemma4_unified")}


def load_gemma4_buffers(model: Any, reader: Any, config: Any) -> list[str]:
    """Copy the HF checkpoint's ``layer_scalar`` into every decoder layer of ``model`` (a module or slime's
    list of virtual-pipeline chunks). slime's loader walks parameters plus ``expert_bias`` buffers only
    (``update_weight/common.py`` ``named_params_and_buffers``), so without this the persistent
    ``layer_scalar`` buffer keeps its initial 1.0. The global layer index is the layer's own
    ``layer_number`` (Megatron's, pipeline offset included). Returns the names written."""
    done: list[str] = []
    chunks = model if isinstance(model, (list, tuple)) else [model]
    with torch.no_grad():
        for chunk in chunks:
            for module in chunk.modules():
                buffer = module._buffers.get("layer_scalar")
                if buffer is None:
                    continue
                name = f"decoder.layers.{int(module.layer_number) - 1}.layer_scalar"
                tensor = gemma4_hf_tensor(name, reader, config)
                buffer.copy_(tensor.reshape(buffer.shape).to(device=buffer.device, dtype=buffer.dtype))
                done.append(name)
    return done


def with_gemma4_buffers(original: Any) -> Any:
    """slime's ``load_hf_weights(args, model, path)`` followed, for Gemma 4 checkpoints, by
    :func:`load_gemma4_buffers` (same ``AutoConfig`` and ``SafetensorReader`` as slime's own call)."""

    @functools.wraps(original)
    def load_hf_weights(args: Any, model: Any, path: Any) -> None:
        original(args, model, path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        if config.model_type not in LOADERS:
            return
        from slime.backends.megatron_utils.hf_to_megatron.common import SafetensorReader

        load_gemma4_buffers(model, SafetensorReader(path), config)

    load_hf_weights.gemma4_hook = True  # type: ignore[attr-defined]
    return load_hf_weights

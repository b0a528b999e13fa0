"""The HF <-> Megatron name and tensor mapping for Gemma 4 text models.

One table, :data:`LAYER_RULES` plus :data:`GLOBAL_RULES`, drives every direction. Names are relative to
the HF text-model prefix (``model.`` for ``Gemma4ForCausalLM``, ``model.language_model.`` for
``Gemma4ForConditionalGeneration``) and to the Megatron ``GPTModel`` root. Transforms:

* ``copy``: same tensor.
* ``qkv``: ``q_proj``, ``k_proj`` (and ``v_proj`` unless the layer is K=V) packed into ``linear_qkv`` in
  Megatron's per-group interleaved layout: for each KV group g, the rows of its ``np/ng`` query heads, then
  k_g, then v_g. K=V full layers have **no V slot** (V is computed from the raw K at run time), so export
  never produces a ``v_proj`` that HF does not have.
* ``fc1``: ``linear_fc1 = cat([gate_proj, up_proj])`` (Megatron's GLU takes the first half as the gate).

This is the TP = 1 layout; sharding is a separate step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError

HF_CAUSAL_LM_PREFIX = "model."
HF_CONDITIONAL_GENERATION_PREFIX = "model.language_model."


@dataclass(frozen=True)
class Rule:
    """One mapping entry: HF names (relative, ``{L}`` = layer) <-> one Megatron name, with a transform."""

    hf: tuple[str, ...]
    mcore: str
    kind: str = "copy"


GLOBAL_RULES: tuple[Rule, ...] = (
    Rule(("embed_tokens.weight",), "embedding.word_embeddings.weight"),
    Rule(("norm.weight",), "decoder.final_layernorm.weight"),
)
UNTIED_HEAD_RULE = Rule(("lm_head.weight",), "output_layer.weight")  # HF name is absolute, not prefixed

LAYER_RULES: tuple[Rule, ...] = (
    Rule(("layers.{L}.input_layernorm.weight",), "decoder.layers.{L}.input_layernorm.weight"),
    Rule(
        (
            "layers.{L}.self_attn.q_proj.weight",
            "layers.{L}.self_attn.k_proj.weight",
            "layers.{L}.self_attn.v_proj.weight",
        ),
        "decoder.layers.{L}.self_attention.linear_qkv.weight",
        "qkv",
    ),
    Rule(("layers.{L}.self_attn.q_norm.weight",), "decoder.layers.{L}.self_attention.q_layernorm.weight"),
    Rule(("layers.{L}.self_attn.k_norm.weight",), "decoder.layers.{L}.self_attention.k_layernorm.weight"),
    Rule(("layers.{L}.self_attn.o_proj.weight",), "decoder.layers.{L}.self_attention.linear_proj.weight"),
    Rule(
        ("layers.{L}.post_attention_layernorm.weight",), "decoder.layers.{L}.post_self_attn_layernorm.weight"
    ),
    Rule(("layers.{L}.pre_feedforward_layernorm.weight",), "decoder.layers.{L}.pre_mlp_layernorm.weight"),
    Rule(
        ("layers.{L}.mlp.gate_proj.weight", "layers.{L}.mlp.up_proj.weight"),
        "decoder.layers.{L}.mlp.linear_fc1.weight",
        "fc1",
    ),
    Rule(("layers.{L}.mlp.down_proj.weight",), "decoder.layers.{L}.mlp.linear_fc2.weight"),
    Rule(("layers.{L}.post_feedforward_layernorm.weight",), "decoder.layers.{L}.post_mlp_layernorm.weight"),
    Rule(("layers.{L}.layer_scalar",), "decoder.layers.{L}.layer_scalar"),
)


# ---- tensor transforms ----------------------------------------------------------------------------------


def pack_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """HF q/k/v projections -> Megatron ``linear_qkv`` (per-group interleaved; no V slot when v is None)."""
    hidden = q.shape[-1]
    groups = [
        q.reshape(num_kv_heads, (num_heads // num_kv_heads) * head_dim, hidden),
        k.reshape(num_kv_heads, head_dim, hidden),
    ]
    if v is not None:
        groups.append(v.reshape(num_kv_heads, head_dim, hidden))
    return torch.cat(groups, dim=1).reshape(-1, hidden)


def unpack_qkv(
    w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, has_v: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`pack_qkv`."""
    hidden = w.shape[-1]
    q_rows = (num_heads // num_kv_heads) * head_dim
    per_group = q_rows + head_dim * (2 if has_v else 1)
    g = w.reshape(num_kv_heads, per_group, hidden)
    q = g[:, :q_rows].reshape(-1, hidden)
    k = g[:, q_rows : q_rows + head_dim].reshape(-1, hidden)
    v = g[:, q_rows + head_dim :].reshape(-1, hidden) if has_v else None
    return q, k, v


# ---- whole state dicts ----------------------------------------------------------------------------------


def _layer_rules(spec: Gemma4TextSpec, layer: int):
    for rule in LAYER_RULES:
        hf = tuple(n.format(L=layer) for n in rule.hf)
        if rule.kind == "qkv" and not spec.has_v_proj(layer):
            hf = hf[:2]
        yield Rule(hf, rule.mcore.format(L=layer), rule.kind)


def expected_hf_names(spec: Gemma4TextSpec) -> list[str]:
    """Every HF text-model tensor name (relative to the prefix) the spec implies, tied head excluded."""
    names = [n for r in GLOBAL_RULES for n in r.hf]
    if not spec.tie_word_embeddings:
        names += list(UNTIED_HEAD_RULE.hf)
    for layer in range(spec.num_layers):
        names += [n for r in _layer_rules(spec, layer) for n in r.hf]
    return names


def hf_to_mcore(hf: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> dict[str, torch.Tensor]:
    """Relative HF tensors -> Megatron (TP = 1) state dict. Missing tensors raise naming the tensor.

    ``lm_head.weight`` (absolute HF name) is read only when the embeddings are untied.
    """

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise InvalidInputError(f"tensor {name!r} is missing from the HF weights")
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    for rule in GLOBAL_RULES:
        out[rule.mcore] = get(rule.hf[0])
    if not spec.tie_word_embeddings:
        out[UNTIED_HEAD_RULE.mcore] = get(UNTIED_HEAD_RULE.hf[0])
    for layer in range(spec.num_layers):
        d, nkv = spec.head_dims[layer], spec.num_kv_heads[layer]
        for rule in _layer_rules(spec, layer):
            tensors = [get(n) for n in rule.hf]
            if rule.kind == "copy":
                out[rule.mcore] = tensors[0]
            elif rule.kind == "qkv":
                v = tensors[2] if len(tensors) == 3 else None
                out[rule.mcore] = pack_qkv(tensors[0], tensors[1], v, spec.num_attention_heads, nkv, d)
            elif rule.kind == "fc1":
                out[rule.mcore] = torch.cat(tensors, dim=0)
    return out


def mcore_to_hf(mc: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> dict[str, torch.Tensor]:
    """Megatron (TP = 1) state dict -> relative HF tensors (plus absolute ``lm_head.weight`` if untied)."""

    def get(name: str) -> torch.Tensor:
        if name not in mc:
            raise InvalidInputError(f"tensor {name!r} is missing from the Megatron weights")
        return mc[name]

    out: dict[str, torch.Tensor] = {}
    for rule in GLOBAL_RULES:
        out[rule.hf[0]] = get(rule.mcore)
    if not spec.tie_word_embeddings:
        out[UNTIED_HEAD_RULE.hf[0]] = get(UNTIED_HEAD_RULE.mcore)
    for layer in range(spec.num_layers):
        d, nkv = spec.head_dims[layer], spec.num_kv_heads[layer]
        for rule in _layer_rules(spec, layer):
            w = get(rule.mcore)
            if rule.kind == "copy":
                out[rule.hf[0]] = w
            elif rule.kind == "qkv":
                q, k, v = unpack_qkv(w, spec.num_attention_heads, nkv, d, has_v=len(rule.hf) == 3)
                out[rule.hf[0]], out[rule.hf[1]] = q, k
                if v is not None:
                    out[rule.hf[2]] = v
            elif rule.kind == "fc1":
                gate, up = w.chunk(2, dim=0)
                out[rule.hf[0]], out[rule.hf[1]] = gate, up
    return out


def load_hf_into_mcore(model: torch.nn.Module, hf: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> None:
    """Copy relative HF tensors into a single-process Megatron model; every parameter must be covered."""
    converted = hf_to_mcore(hf, spec)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(converted))
    extra = sorted(set(converted) - set(own))
    if missing or extra:
        raise InvalidInputError(f"mapping does not cover the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, target in own.items():
            src = converted[name]
            if tuple(src.shape) != tuple(target.shape):
                raise InvalidInputError(
                    f"tensor {name!r}: HF weights give shape {tuple(src.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(src.to(target.dtype))

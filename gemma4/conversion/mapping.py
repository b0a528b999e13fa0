"""The HF <-> Megatron name and tensor mapping for Gemma 4 text models.

One table, :data:`GLOBAL_RULES` + :data:`UNTIED_HEAD_RULE` + :data:`LAYER_RULES` (+ :data:`MOE_LAYER_RULES`
on MoE layers), drives every direction: HF -> Megatron, Megatron -> HF export, the streaming
converter slime calls (:mod:`gemma4.conversion.streaming`), tensor-parallel sharding
(:mod:`gemma4.conversion.sharding`) and the expected shapes of every tensor (:data:`HF_SHAPES`).

Names are relative to the HF text-model prefix (``model.`` for ``Gemma4ForCausalLM``,
``model.language_model.`` for ``Gemma4ForConditionalGeneration``) and to the Megatron ``GPTModel`` root;
``lm_head.weight`` is absolute and exists only when the embeddings are untied. Transforms (``Rule.kind``):

* ``copy``: same tensor.
* ``qkv``: ``q_proj``, ``k_proj`` (and ``v_proj`` unless the layer is K=V) packed into ``linear_qkv`` in
  Megatron's per-group interleaved layout: for each KV group g, the rows of its ``np/ng`` query heads, then
  k_g, then v_g, with the layer's own head dim and KV-head count.
* ``fc1``: ``linear_fc1 = cat([gate_proj, up_proj])`` (Megatron's GLU takes the first half as the gate).
* ``experts_fc1`` / ``experts_fc2`` (MoE): HF stores all experts of a layer in one 3-D tensor
  (``gate_up_proj`` [E, 2I, H], rows ``[gate; up]``; ``down_proj`` [E, H, I]); Megatron has one
  ``linear_fc1`` [2I, H] = ``gate_up_proj[e]`` and one ``linear_fc2`` [H, I] = ``down_proj[e]`` per expert.

**K=V V-slot policy.** Full-attention layers with ``attention_k_eq_v`` have no ``v_proj`` in HF (V is
``v_norm`` of the raw K projection). Our ``linear_qkv`` on those layers has **no V slot**
(``[q heads of g, k_g]`` per group; see ``gemma4.model.attention.KEqVColumnParallelLinear``): nothing is
synthesised on import, nothing can drift in training, and export never emits a ``v_proj`` HF does not have.

**Tensor parallelism** (``Rule.tp``): how Megatron splits each tensor over TP ranks. ``qkv`` splits dim 0 by
whole KV groups (with fewer KV heads than ranks: by rows, the groups replicated at run time), ``glu`` gives rank r ``[gate_r; up_r]``, ``column``/``vocab`` split dim 0, ``row`` splits
dim 1, ``replicated`` copies. ``None`` means "implied by the kind" (qkv -> ``qkv``, fc1 -> ``glu``,
otherwise ``replicated``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from gemma4.config import HF_CAUSAL_LM_PREFIX as HF_CAUSAL_LM_PREFIX  # re-exported: the prefix rule is
from gemma4.config import HF_CONDITIONAL_GENERATION_PREFIX as HF_CONDITIONAL_GENERATION_PREFIX  # config's
from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError

# Tensor-parallel layouts (see module docstring).
REPLICATED = "replicated"
COLUMN = "column"
ROW = "row"
VOCAB = "vocab"
QKV_GROUPS = "qkv"
GLU = "glu"
TP_LAYOUTS = (REPLICATED, COLUMN, ROW, VOCAB, QKV_GROUPS, GLU)


@dataclass(frozen=True)
class Rule:
    """One mapping entry: HF names (relative, ``{L}`` = layer) <-> one Megatron name, with a transform.

    ``tp`` is the tensor-parallel layout of the Megatron tensor (``None``: implied by ``kind``).
    Expert rules have ``{e}`` in the Megatron name (one Megatron tensor per expert).
    """

    hf: tuple[str, ...]
    mcore: str
    kind: str = "copy"
    tp: str | None = None

    @property
    def tp_layout(self) -> str:
        """The effective TP layout."""
        if self.tp is not None:
            return self.tp
        return {"qkv": QKV_GROUPS, "fc1": GLU, "experts_fc1": GLU, "experts_fc2": ROW}.get(
            self.kind, REPLICATED
        )

    @property
    def is_expert(self) -> bool:
        """True for per-expert Megatron tensors (placed on expert-parallel ranks)."""
        return self.kind in ("experts_fc1", "experts_fc2")


GLOBAL_RULES: tuple[Rule, ...] = (
    Rule(("embed_tokens.weight",), "embedding.word_embeddings.weight", tp=VOCAB),
    Rule(("norm.weight",), "decoder.final_layernorm.weight"),
)
UNTIED_HEAD_RULE = Rule(("lm_head.weight",), "output_layer.weight", tp=VOCAB)  # HF name is absolute

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
    Rule(
        ("layers.{L}.self_attn.o_proj.weight",),
        "decoder.layers.{L}.self_attention.linear_proj.weight",
        tp=ROW,
    ),
    Rule(
        ("layers.{L}.post_attention_layernorm.weight",), "decoder.layers.{L}.post_self_attn_layernorm.weight"
    ),
    Rule(("layers.{L}.pre_feedforward_layernorm.weight",), "decoder.layers.{L}.pre_mlp_layernorm.weight"),
    Rule(
        ("layers.{L}.mlp.gate_proj.weight", "layers.{L}.mlp.up_proj.weight"),
        "decoder.layers.{L}.mlp.linear_fc1.weight",
        "fc1",
    ),
    Rule(("layers.{L}.mlp.down_proj.weight",), "decoder.layers.{L}.mlp.linear_fc2.weight", tp=ROW),
    Rule(("layers.{L}.post_feedforward_layernorm.weight",), "decoder.layers.{L}.post_mlp_layernorm.weight"),
    Rule(("layers.{L}.layer_scalar",), "decoder.layers.{L}.layer_scalar"),
)

# MoE rows (26B-A4B), named after gemma4.model.moe.Gemma4MoELayer: Megatron's MoELayer (``mlp.router``,
# ``mlp.experts.local_experts.{e}`` = SequentialMLP) holding Gemma 4's dense branch (``mlp.dense_mlp``) and
# the four branch norms. On MoE layers these replace the dense ``mlp.linear_fc1/fc2`` rows and the layer's
# ``pre_mlp_layernorm`` (the block norms its own inputs; ``post_mlp_layernorm`` stays).
MOE_LAYER_RULES: tuple[Rule, ...] = (
    Rule(("layers.{L}.router.proj.weight",), "decoder.layers.{L}.mlp.router.weight"),
    Rule(("layers.{L}.router.scale",), "decoder.layers.{L}.mlp.router.scale"),
    Rule(("layers.{L}.router.per_expert_scale",), "decoder.layers.{L}.mlp.router.per_expert_scale"),
    Rule(
        ("layers.{L}.experts.gate_up_proj",),
        "decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc1.weight",
        "experts_fc1",
    ),
    Rule(
        ("layers.{L}.experts.down_proj",),
        "decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc2.weight",
        "experts_fc2",
    ),
    Rule(
        ("layers.{L}.pre_feedforward_layernorm.weight",), "decoder.layers.{L}.mlp.pre_dense_layernorm.weight"
    ),
    Rule(
        ("layers.{L}.mlp.gate_proj.weight", "layers.{L}.mlp.up_proj.weight"),
        "decoder.layers.{L}.mlp.dense_mlp.linear_fc1.weight",
        "fc1",
    ),
    Rule(
        ("layers.{L}.mlp.down_proj.weight",),
        "decoder.layers.{L}.mlp.dense_mlp.linear_fc2.weight",
        tp=ROW,
    ),
    Rule(
        ("layers.{L}.post_feedforward_layernorm_1.weight",),
        "decoder.layers.{L}.mlp.post_dense_layernorm.weight",
    ),
    Rule(
        ("layers.{L}.pre_feedforward_layernorm_2.weight",),
        "decoder.layers.{L}.mlp.pre_experts_layernorm.weight",
    ),
    Rule(
        ("layers.{L}.post_feedforward_layernorm_2.weight",),
        "decoder.layers.{L}.mlp.post_experts_layernorm.weight",
    ),
)
# E2B/E4B per-layer embeddings (PLE): the global table, projection and norm (see gemma4.model.gpt_model), and
# per layer the input gate, projection and norm (gemma4.model.layer).
PLE_GLOBAL_RULES: tuple[Rule, ...] = (
    Rule(("embed_tokens_per_layer.weight",), "per_layer_embedding.weight", tp=VOCAB),
    Rule(("per_layer_model_projection.weight",), "per_layer_model_projection.weight", tp=COLUMN),
    Rule(("per_layer_projection_norm.weight",), "per_layer_projection_norm.weight"),
)
PLE_LAYER_RULES: tuple[Rule, ...] = (
    Rule(
        ("layers.{L}.per_layer_input_gate.weight",),
        "decoder.layers.{L}.per_layer_input_gate.weight",
        tp=COLUMN,
    ),
    Rule(
        ("layers.{L}.per_layer_projection.weight",), "decoder.layers.{L}.per_layer_projection.weight", tp=ROW
    ),
    Rule(
        ("layers.{L}.post_per_layer_input_norm.weight",),
        "decoder.layers.{L}.post_per_layer_input_norm.weight",
    ),
)
# KV-shared ("reuse") layers own no k_proj/v_proj/k_norm: linear_qkv holds only the query rows (HF order,
# split over TP like any column-parallel weight) and there is no k_layernorm.
_KV_OWNED_HF = ("layers.{L}.self_attn.k_norm.weight",)

_DENSE_MLP_MCORE = (
    "decoder.layers.{L}.mlp.linear_fc1.weight",
    "decoder.layers.{L}.mlp.linear_fc2.weight",
    "decoder.layers.{L}.pre_mlp_layernorm.weight",
)


# Expected HF shape of every tensor template, from the config (checked against HF models in the tests).
HF_SHAPES: dict[str, Callable[[Gemma4TextSpec, int | None], tuple[int, ...]]] = {
    "embed_tokens.weight": lambda s, L: (s.vocab_size, s.hidden_size),
    "norm.weight": lambda s, L: (s.hidden_size,),
    "lm_head.weight": lambda s, L: (s.vocab_size, s.hidden_size),
    "layers.{L}.input_layernorm.weight": lambda s, L: (s.hidden_size,),
    "layers.{L}.self_attn.q_proj.weight": lambda s, L: (
        s.num_attention_heads * s.head_dims[L],
        s.hidden_size,
    ),
    "layers.{L}.self_attn.k_proj.weight": lambda s, L: (s.num_kv_heads[L] * s.head_dims[L], s.hidden_size),
    "layers.{L}.self_attn.v_proj.weight": lambda s, L: (s.num_kv_heads[L] * s.head_dims[L], s.hidden_size),
    "layers.{L}.self_attn.q_norm.weight": lambda s, L: (s.head_dims[L],),
    "layers.{L}.self_attn.k_norm.weight": lambda s, L: (s.head_dims[L],),
    "layers.{L}.self_attn.o_proj.weight": lambda s, L: (
        s.hidden_size,
        s.num_attention_heads * s.head_dims[L],
    ),
    "layers.{L}.post_attention_layernorm.weight": lambda s, L: (s.hidden_size,),
    "layers.{L}.pre_feedforward_layernorm.weight": lambda s, L: (s.hidden_size,),
    "layers.{L}.mlp.gate_proj.weight": lambda s, L: (_mlp_width(s, L), s.hidden_size),
    "layers.{L}.mlp.up_proj.weight": lambda s, L: (_mlp_width(s, L), s.hidden_size),
    "layers.{L}.mlp.down_proj.weight": lambda s, L: (s.hidden_size, _mlp_width(s, L)),
    "layers.{L}.post_feedforward_layernorm.weight": lambda s, L: (s.hidden_size,),
    "layers.{L}.layer_scalar": lambda s, L: (1,),
    # MoE (26B-A4B)
    "layers.{L}.router.proj.weight": lambda s, L: (s.num_experts, s.hidden_size),
    "layers.{L}.router.scale": lambda s, L: (s.hidden_size,),
    "layers.{L}.router.per_expert_scale": lambda s, L: (s.num_experts,),
    "layers.{L}.experts.gate_up_proj": lambda s, L: (
        s.num_experts,
        2 * s.moe_intermediate_size,
        s.hidden_size,
    ),
    "layers.{L}.experts.down_proj": lambda s, L: (s.num_experts, s.hidden_size, s.moe_intermediate_size),
    "layers.{L}.pre_feedforward_layernorm_2.weight": lambda s, L: (s.hidden_size,),
    "layers.{L}.post_feedforward_layernorm_1.weight": lambda s, L: (s.hidden_size,),
    "layers.{L}.post_feedforward_layernorm_2.weight": lambda s, L: (s.hidden_size,),
    # PLE (E2B/E4B)
    "embed_tokens_per_layer.weight": lambda s, L: (s.ple_vocab_size, s.num_layers * s.ple_dim),
    "per_layer_model_projection.weight": lambda s, L: (s.num_layers * s.ple_dim, s.hidden_size),
    "per_layer_projection_norm.weight": lambda s, L: (s.ple_dim,),
    "layers.{L}.per_layer_input_gate.weight": lambda s, L: (s.ple_dim, s.hidden_size),
    "layers.{L}.per_layer_projection.weight": lambda s, L: (s.hidden_size, s.ple_dim),
    "layers.{L}.post_per_layer_input_norm.weight": lambda s, L: (s.hidden_size,),
}


def _mlp_width(spec, layer: int) -> int:
    """Dense MLP width of a layer: 2x on KV-shared layers with the double-wide MLP (E2B)."""
    sizes = getattr(spec, "intermediate_sizes", ())
    return sizes[layer] if sizes else spec.intermediate_size


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


def expert_placement(expert: int, num_experts: int, ep: int) -> tuple[int, int]:
    """Global expert index -> (expert-parallel rank, local index on that rank): ``e // (E/ep), e % (E/ep)``."""
    per_rank = num_experts // ep
    return expert // per_rank, expert % per_rank


def global_expert_index(ep_rank: int, local: int, num_experts: int, ep: int) -> int:
    """Inverse of :func:`expert_placement`."""
    return ep_rank * (num_experts // ep) + local


def split_experts(t: torch.Tensor) -> list[torch.Tensor]:
    """HF ``gate_up_proj`` [E, 2I, H] or ``down_proj`` [E, H, I] -> per-expert Megatron fc1 / fc2 tensors."""
    return list(t.unbind(0))


def stack_experts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-expert Megatron fc1 / fc2 tensors (global order) -> the HF 3-D tensor."""
    return torch.stack(list(tensors), dim=0)


# ---- the table, bound to a config -----------------------------------------------------------------------


def _num_experts(spec) -> int:
    """Routed experts per layer (0 for dense models)."""
    if not getattr(spec, "enable_moe", False):
        return 0
    return int(spec.num_experts or 0)


def _layer_rules(spec: Gemma4TextSpec, layer: int) -> Iterator[Rule]:
    """The rules of decoder layer ``layer`` with ``{L}`` filled in (K=V layers: no ``v_proj``)."""
    rules = LAYER_RULES
    if _num_experts(spec) > 0:
        rules = tuple(r for r in LAYER_RULES if r.mcore not in _DENSE_MLP_MCORE) + MOE_LAYER_RULES
    if getattr(spec, "ple_dim", 0):
        rules = rules + PLE_LAYER_RULES
    reuse = spec.reuses_kv(layer) if hasattr(spec, "reuses_kv") else False
    for rule in rules:
        if reuse and rule.hf[0] in _KV_OWNED_HF:
            continue
        hf = tuple(n.format(L=layer) for n in rule.hf)
        mcore = rule.mcore.replace("{L}", str(layer))
        if rule.kind == "qkv" and reuse:
            yield Rule(hf[:1], mcore, "copy", COLUMN)  # query rows only
            continue
        if rule.kind == "qkv" and not spec.has_v_proj(layer):
            hf = hf[:2]
        yield Rule(hf, mcore, rule.kind, rule.tp)


def global_rules(spec: Gemma4TextSpec) -> list[Rule]:
    """Embedding and final norm, plus the output layer only when the embeddings are untied."""
    rules = list(GLOBAL_RULES)
    if getattr(spec, "ple_dim", 0):
        rules += list(PLE_GLOBAL_RULES)
    if not spec.tie_word_embeddings:
        rules.append(UNTIED_HEAD_RULE)
    return rules


def bound_rules(spec: Gemma4TextSpec) -> list[tuple[Rule, int | None]]:
    """Every rule of the model, in checkpoint order, with its layer (``None`` for global tensors).

    Order: embedding, decoder layers, final norm, output layer. Each HF and each Megatron tensor appears
    in exactly one rule (the key contract).
    """
    glob = global_rules(spec)
    out: list[tuple[Rule, int | None]] = [(glob[0], None)]
    for layer in range(spec.num_layers):
        out += [(r, layer) for r in _layer_rules(spec, layer)]
    out += [(r, None) for r in glob[1:]]
    return out


def expected_hf_names(spec: Gemma4TextSpec) -> list[str]:
    """Every HF text-model tensor name (relative to the prefix) the spec implies, tied head excluded."""
    names = [n for r in global_rules(spec) for n in r.hf]
    for layer in range(spec.num_layers):
        names += [n for r in _layer_rules(spec, layer) for n in r.hf]
    return names


def _template(name: str, layer: int | None) -> str:
    return name if layer is None else name.replace(f"layers.{layer}.", "layers.{L}.", 1)


def hf_shape(name: str, spec: Gemma4TextSpec, layer: int | None) -> tuple[int, ...]:
    """Expected shape of HF tensor ``name`` (relative) of ``layer`` under ``spec``."""
    fn = HF_SHAPES.get(_template(name, layer))
    if fn is None:
        raise KeyError(f"no shape rule for HF tensor {name!r}")
    return tuple(fn(spec, layer))


def rule_to_mcore(
    rule: Rule, tensors: Sequence[torch.Tensor], spec: Gemma4TextSpec, layer: int | None
) -> torch.Tensor | list[torch.Tensor]:
    """HF tensors of ``rule`` (in ``rule.hf`` order) -> the Megatron tensor (a per-expert list for experts)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "qkv":
        v = tensors[2] if len(tensors) == 3 else None
        return pack_qkv(
            tensors[0],
            tensors[1],
            v,
            spec.num_attention_heads,
            spec.num_kv_heads[layer],
            spec.head_dims[layer],
        )
    if rule.kind == "fc1":
        return torch.cat(list(tensors), dim=0)
    if rule.is_expert:
        return split_experts(tensors[0])
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def rule_to_hf(
    rule: Rule, w: torch.Tensor | Sequence[torch.Tensor], spec: Gemma4TextSpec, layer: int | None
) -> list[tuple[str, torch.Tensor]]:
    """Megatron tensor of ``rule`` -> its HF ``(relative name, tensor)`` pairs, in ``rule.hf`` order."""
    if rule.kind == "copy":
        tensors = [w]
    elif rule.kind == "qkv":
        q, k, v = unpack_qkv(
            w,
            spec.num_attention_heads,
            spec.num_kv_heads[layer],
            spec.head_dims[layer],
            has_v=len(rule.hf) == 3,
        )
        tensors = [q, k] + ([v] if v is not None else [])
    elif rule.kind == "fc1":
        tensors = list(w.chunk(2, dim=0))
    elif rule.is_expert:
        tensors = [stack_experts(w)]
    else:
        raise ValueError(f"unknown rule kind {rule.kind!r}")
    return list(zip(rule.hf, tensors))


# ---- whole state dicts ----------------------------------------------------------------------------------


def hf_to_mcore(hf: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> dict[str, torch.Tensor]:
    """Relative HF tensors -> Megatron (TP = 1) state dict. Missing tensors raise naming the tensor.

    ``lm_head.weight`` (absolute HF name) is read only when the embeddings are untied.
    """

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise InvalidInputError(f"tensor {name!r} is missing from the HF weights")
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    for rule, layer in bound_rules(spec):
        w = rule_to_mcore(rule, [get(n) for n in rule.hf], spec, layer)
        if rule.is_expert:
            for e, t in enumerate(w):
                out[rule.mcore.format(e=e)] = t
        else:
            out[rule.mcore] = w
    return out


def mcore_to_hf(mc: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> dict[str, torch.Tensor]:
    """Megatron (TP = 1) state dict -> relative HF tensors (plus absolute ``lm_head.weight`` if untied)."""

    def get(name: str) -> torch.Tensor:
        if name not in mc:
            raise InvalidInputError(f"tensor {name!r} is missing from the Megatron weights")
        return mc[name]

    out: dict[str, torch.Tensor] = {}
    for rule, layer in bound_rules(spec):
        if rule.is_expert:
            w = [get(rule.mcore.format(e=e)) for e in range(_num_experts(spec))]
        else:
            w = get(rule.mcore)
        for name, t in rule_to_hf(rule, w, spec, layer):
            out[name] = t
    return out


def load_hf_into_mcore(model: torch.nn.Module, hf: Mapping[str, torch.Tensor], spec: Gemma4TextSpec) -> None:
    """Copy relative HF tensors into a single-process Megatron model; every parameter must be covered."""
    load_mcore_state_dict(model, hf_to_mcore(hf, spec), source="HF weights")


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model``'s state dict that hold weights (``_extra_state`` entries aside)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def load_strict(
    targets: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    *,
    optional: Callable[[str], bool] | None = None,
    prepare: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """The one strict loader: copy ``given[name]`` into every ``targets[name]``, cast to its dtype.

    Every target must be given and nothing else may be (a given name for which ``optional(name)`` holds may
    lack a target: experts that live on another EP rank); each given tensor, after ``prepare(name, tensor)``
    (cutting it for this rank), must have its target's shape. Refusals name the tensors and ``source``.
    """
    keys = {k for k in given if k in targets or optional is None or not optional(k)}
    missing = sorted(set(targets) - keys)
    extra = sorted(keys - set(targets))
    if missing or extra:
        raise InvalidInputError(f"{source} do not cover the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, target in targets.items():
            src = given[name] if prepare is None else prepare(name, given[name])
            if tuple(src.shape) != tuple(target.shape):
                raise InvalidInputError(
                    f"tensor {name!r}: {source} give shape {tuple(src.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(src.to(target.dtype))


def load_mcore_state_dict(
    model: torch.nn.Module, converted: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy a Megatron state dict into ``model`` strictly (``_extra_state`` aside), casting to its dtypes
    (:func:`load_strict`)."""
    load_strict(model_tensors(model), converted, source)

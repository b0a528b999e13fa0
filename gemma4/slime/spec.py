"""``--spec gemma4.slime.spec get_gemma4_spec``: the Gemma 4 decoder block spec from slime's arguments.

slime (Megatron-LM's ``model_provider``) calls ``get_gemma4_spec(args, config, vp_stage)`` with the parsed
arguments and the ``TransformerConfig`` it built from them, then hands *that same config object* to the
model. This function therefore

1. reads the model from ``args.hf_checkpoint``'s ``config.json`` and checks every Megatron flag against it
   (:mod:`gemma4.slime.args`; a disagreement raises, naming the flag);
2. adds the Gemma 4 fields our modules read to ``config`` **in place** (``gemma4``, ``layer_type``,
   ``gemma4_attention_backend``) and sets what Gemma 4 needs and Megatron has no flag for, taking the values
   from the config the CPU gate builds (:func:`reference_config`, :data:`REPLACEABLE`): where ``config``
   still holds Megatron's default the value is replaced, where it holds another user choice (``--swiglu``,
   ``--moe-grouped-gemm``, ...) it raises;
3. returns :func:`gemma4.model.spec.get_gemma4_decoder_block_spec` for this pipeline stage, with Transformer
   Engine linears swapped in for ``--transformer-impl transformer_engine`` (:func:`swap_linears`).

A plain ``GPTModel`` built from this spec would still lack the embedding scale, the dual RoPE and the logit
softcap, so ``--spec`` is refused unless ``--custom-model-provider-path`` names our model provider.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError
from gemma4.slime.args import PROVIDER_PATH, SPEC_FLAG, require_matching_args, text_spec_from_args

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "dense", "blockwise", "flash")
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def reference_config(config: Any, spec: Gemma4TextSpec) -> Any:
    """What :func:`gemma4.model.transformer_config.make_transformer_config` (the config the CPU parity gate
    builds) makes of ``spec`` under ``config``'s dtype and parallel sizes; it also refuses what our model does
    not support there (e.g. pipeline parallelism with per-layer embeddings), naming the field."""
    from gemma4.model.transformer_config import make_transformer_config

    pipeline = {}
    if config.pipeline_model_parallel_size > 1:
        pipeline = {"pipeline_dtype": getattr(config, "pipeline_dtype", None) or config.params_dtype}
    return make_transformer_config(
        spec,
        config.params_dtype,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        context_parallel_size=config.context_parallel_size,
        sequence_parallel=config.sequence_parallel,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        **pipeline,
    )


# field -> values of Megatron's that it may replace; None = replace whatever is there (kernel switches our
# modules do not implement; Megatron-LM turns some of them on by default).
REPLACEABLE: dict[str, tuple[Any, ...] | None] = {
    "gated_linear_unit": (False,),
    "activation_func": ("gelu",),  # Megatron's default F.gelu (erf); compared by name
    "softmax_scale": (None,),
    "bias_activation_fusion": None,
    "masked_softmax_fusion": None,
    "apply_rope_fusion": None,
    "persist_layer_norm": None,
}
MOE_REPLACEABLE: dict[str, tuple[Any, ...] | None] = {
    "moe_router_pre_softmax": None,  # documents Gemma4Router's order (softmax over all experts, then top-k)
    "moe_grouped_gemm": (False,),  # the experts are SequentialMLP
    "moe_router_load_balancing_type": ("aux_loss", "none"),  # Gemma4Router: aux loss only via the coefficient
}


def _name(value: Any) -> Any:
    return getattr(value, "__name__", value)


def apply_gemma4_config(config: Any, spec: Gemma4TextSpec, attention_backend: str = "auto") -> list[str]:
    """Make ``config`` (a Megatron ``TransformerConfig``) build Gemma 4, in place; returns what it changed.

    The Gemma 4 values come from :func:`reference_config`; ``hetereogenous_dist_checkpoint`` is switched on
    (one checkpoint key per layer, as ``gemma4-harness convert --format torch_dist`` writes them)."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise InvalidInputError(
            f"gemma4 attention backend {attention_backend!r} (GEMMA4_ATTENTION_BACKEND); choose {ATTENTION_BACKENDS}"
        )
    ours = reference_config(config, spec)
    fields = dict(REPLACEABLE) | (MOE_REPLACEABLE if spec.enable_moe else {})
    changes: list[str] = []
    for name, replaceable in fields.items():
        value, current = getattr(ours, name), getattr(config, name, None)
        if current is value or current == value:
            continue
        if replaceable is not None and not any(_name(current) == r for r in replaceable):
            raise InvalidInputError(
                f"config.{name} is {_name(current)!r} from the slime/Megatron flags; Gemma 4 needs "
                f"{_name(value)!r} (remove the flag that sets it)"
            )
        setattr(config, name, value)
        changes.append(f"{name}={_name(value)!r}")
    if not getattr(config, "hetereogenous_dist_checkpoint", False):
        config.hetereogenous_dist_checkpoint = True
        changes.append("hetereogenous_dist_checkpoint=True")
    config.gemma4 = spec
    config.layer_type = None
    config.gemma4_attention_backend = attention_backend
    return changes


def attention_backend_from(args: Any) -> str:
    """``args.gemma4_attention_backend``, else ``$GEMMA4_ATTENTION_BACKEND``, else ``auto``."""
    return (
        getattr(args, "gemma4_attention_backend", None)
        or os.environ.get("GEMMA4_ATTENTION_BACKEND")
        or "auto"
    )


def swap_linears(block_spec: Any, column: type, row: type) -> Any:
    """A copy of ``block_spec`` with every plain ``ColumnParallelLinear`` / ``RowParallelLinear`` replaced by
    ``column`` / ``row`` (subclasses such as the K=V ``linear_qkv`` keep their own class)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    def walk(node: Any) -> Any:
        if node is ColumnParallelLinear:
            return column
        if node is RowParallelLinear:
            return row
        if isinstance(node, ModuleSpec):
            params = {k: walk(v) for k, v in node.params.items()}
            return dataclasses.replace(node, params=params, submodules=walk(node.submodules))
        if isinstance(node, list):
            return [walk(x) for x in node]
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return dataclasses.replace(
                node, **{f.name: walk(getattr(node, f.name)) for f in dataclasses.fields(node) if f.init}
            )
        return node

    return walk(block_spec)


def transformer_engine_linears() -> tuple[type, type]:
    """Transformer Engine's column / row parallel linears (raises naming the flag when TE is missing)."""
    try:  # Megatron hands out stand-ins when TE is missing, so TE itself is imported first
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        if not (isinstance(TEColumnParallelLinear, type) and isinstance(TERowParallelLinear, type)):
            raise ImportError("megatron.core.extensions.transformer_engine has no TE linear classes")
    except Exception as exc:  # noqa: BLE001 - absent or broken TE: the flag cannot be honoured
        raise InvalidInputError(
            f"--transformer-impl transformer_engine, but Transformer Engine is not importable ({exc}); "
            "pass --transformer-impl local"
        ) from exc
    return TEColumnParallelLinear, TERowParallelLinear


def build_block_spec(args: Any, config: Any, vp_stage: int | None = None) -> Any:
    """Steps 1-3 of the module docstring without the provider check (the model provider calls this)."""
    from gemma4.model.spec import get_gemma4_decoder_block_spec

    spec = text_spec_from_args(args)
    require_matching_args(args, spec)
    impl = getattr(args, "transformer_impl", "local") or "local"
    if impl not in TRANSFORMER_IMPLS:
        raise InvalidInputError(f"--transformer-impl {impl!r}: Gemma 4 supports {list(TRANSFORMER_IMPLS)}")
    changes = apply_gemma4_config(config, spec, attention_backend_from(args))
    if changes:
        log.info("gemma4: set %s on the Megatron config", ", ".join(changes))
    block = get_gemma4_decoder_block_spec(config, vp_stage=vp_stage)
    if impl == "transformer_engine":
        block = swap_linears(block, *transformer_engine_linears())
    return block


def get_gemma4_spec(args: Any, config: Any, vp_stage: int | None = None) -> Any:
    """slime's ``--spec gemma4.slime.spec get_gemma4_spec`` hook: the block spec of this pipeline stage."""
    provider = getattr(args, "custom_model_provider_path", None)
    if provider != PROVIDER_PATH:
        raise InvalidInputError(
            f"--spec {' '.join(SPEC_FLAG)} needs --custom-model-provider-path {PROVIDER_PATH} "
            f"(got {provider!r}): a plain GPTModel lacks Gemma 4's embedding scale, dual RoPE and logit softcap"
        )
    return build_block_spec(args, config, vp_stage)

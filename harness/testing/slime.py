"""Test scaffolding for the slime entry points: Megatron-LM's argument parsing and config translation,
reduced to the flags and fields the plugin reads.

Megatron-LM (``megatron.training``) is not installable here, so the contract tests build slime's ``args``
and ``TransformerConfig`` with these stand-ins: :func:`parse_megatron_flags` knows Megatron-LM's defaults for
every attribute the plugin reads (dropouts 0.1, LayerNorm, biases on, fused kernels on, TE), and
:func:`transformer_config_from_args` follows ``core_transformer_config_from_args`` (copy every matching
field, then ``layernorm_epsilon``, ``layernorm_zero_centered_gamma``, ``persist_layer_norm``,
``num_moe_experts``, ``--swiglu`` and the bias-activation fusion switch). They are not the real thing; the
GPU stage and the e2e run use the real Megatron-LM.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from typing import Any

import torch

from gemma4.errors import InvalidInputError
from gemma4.slime.args import MEGATRON_FLAG_DEFAULTS

# flag -> (attribute, kind); kind: int, float, str, true (store_true), false (store_false), list2
FLAGS: dict[str, tuple[str, str]] = {
    "--num-layers": ("num_layers", "int"),
    "--hidden-size": ("hidden_size", "int"),
    "--ffn-hidden-size": ("ffn_hidden_size", "int"),
    "--num-attention-heads": ("num_attention_heads", "int"),
    "--group-query-attention": ("group_query_attention", "true"),
    "--num-query-groups": ("num_query_groups", "int"),
    "--kv-channels": ("kv_channels", "int"),
    "--vocab-size": ("vocab_size", "int"),
    "--make-vocab-size-divisible-by": ("make_vocab_size_divisible_by", "int"),
    "--max-position-embeddings": ("max_position_embeddings", "int"),
    "--normalization": ("normalization", "str"),
    "--norm-epsilon": ("norm_epsilon", "float"),
    "--qk-layernorm": ("qk_layernorm", "true"),
    "--disable-bias-linear": ("add_bias_linear", "false"),
    "--add-qkv-bias": ("add_qkv_bias", "true"),
    "--swiglu": ("swiglu", "true"),
    "--apply-layernorm-1p": ("apply_layernorm_1p", "true"),
    "--untie-embeddings-and-output-weights": ("untie_embeddings_and_output_weights", "true"),
    "--attention-dropout": ("attention_dropout", "float"),
    "--hidden-dropout": ("hidden_dropout", "float"),
    "--num-experts": ("num_experts", "int"),
    "--moe-router-topk": ("moe_router_topk", "int"),
    "--moe-ffn-hidden-size": ("moe_ffn_hidden_size", "int"),
    "--moe-router-load-balancing-type": ("moe_router_load_balancing_type", "str"),
    "--moe-aux-loss-coeff": ("moe_aux_loss_coeff", "float"),
    "--moe-token-dispatcher-type": ("moe_token_dispatcher_type", "str"),
    "--moe-grouped-gemm": ("moe_grouped_gemm", "true"),
    "--transformer-impl": ("transformer_impl", "str"),
    "--spec": ("spec", "list2"),
    "--custom-model-provider-path": ("custom_model_provider_path", "str"),
    "--hf-checkpoint": ("hf_checkpoint", "str"),
    "--no-bias-gelu-fusion": ("bias_gelu_fusion", "false"),
    "--no-rope-fusion": ("apply_rope_fusion", "false"),
    "--no-masked-softmax-fusion": ("masked_softmax_fusion", "false"),
    "--no-persist-layer-norm": ("no_persist_layer_norm", "true"),
    "--bf16": ("bf16", "true"),
    "--tensor-model-parallel-size": ("tensor_model_parallel_size", "int"),
    "--sequence-parallel": ("sequence_parallel", "true"),
}

MEGATRON_DEFAULTS: dict[str, Any] = {
    **MEGATRON_FLAG_DEFAULTS,  # the product's own table of the defaults it checks
    "group_query_attention": False,
    "num_query_groups": 1,
    "kv_channels": None,
    "vocab_size": None,
    "make_vocab_size_divisible_by": 128,
    "max_position_embeddings": None,
    "norm_epsilon": 1e-5,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 0.0,
    "moe_token_dispatcher_type": "allgather",
    "moe_grouped_gemm": False,
    "transformer_impl": "transformer_engine",
    "spec": None,
    "custom_model_provider_path": None,
    "hf_checkpoint": None,
    "bf16": False,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "context_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "sequence_parallel": False,
    "no_persist_layer_norm": False,
    "bias_gelu_fusion": True,
    "bias_swiglu_fusion": True,
    "masked_softmax_fusion": True,
    "apply_rope_fusion": True,
    "position_embedding_type": "learned_absolute",
}


def parse_megatron_flags(tokens: Sequence[str], **overrides: Any) -> types.SimpleNamespace:
    """Megatron-LM-like parsed args for ``tokens`` (unknown flags raise), then ``overrides``; the derived
    ``params_dtype`` and ``padded_vocab_size`` are computed as Megatron-LM does."""
    values = dict(MEGATRON_DEFAULTS)
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        if flag not in FLAGS:
            raise InvalidInputError(f"parse_megatron_flags: unknown flag {flag!r}")
        attr, kind = FLAGS[flag]
        if kind == "true":
            values[attr], i = True, i + 1
        elif kind == "false":
            values[attr], i = False, i + 1
        elif kind == "list2":
            values[attr], i = list(tokens[i + 1 : i + 3]), i + 3
        else:
            raw = tokens[i + 1]
            values[attr] = {"int": int, "float": float, "str": str}[kind](raw)
            i += 2
    values.update(overrides)
    values["params_dtype"] = torch.bfloat16 if values["bf16"] else torch.float32
    if values["vocab_size"] is not None:
        multiple = values["make_vocab_size_divisible_by"] * values["tensor_model_parallel_size"]
        values["padded_vocab_size"] = -(-values["vocab_size"] // multiple) * multiple
    return types.SimpleNamespace(**values)


def transformer_config_from_args(args: Any, **extra: Any) -> Any:
    """A plain Megatron ``TransformerConfig`` the way ``core_transformer_config_from_args`` builds it."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig) if f.init}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    kw["persist_layer_norm"] = not args.no_persist_layer_norm
    kw["layernorm_zero_centered_gamma"] = args.apply_layernorm_1p
    kw["layernorm_epsilon"] = args.norm_epsilon
    kw["pipeline_dtype"] = args.params_dtype
    kw["num_moe_experts"] = args.num_experts
    kw["num_query_groups"] = args.num_query_groups if args.group_query_attention else None
    if args.swiglu:
        kw["activation_func"] = F.silu
        kw["gated_linear_unit"] = True
        kw["bias_activation_fusion"] = args.bias_swiglu_fusion
    else:
        kw["bias_activation_fusion"] = args.bias_gelu_fusion
    kw["use_cpu_initialization"] = True
    kw.update(extra)
    return TransformerConfig(**kw)


def flags_for_spec(spec: Any, *, transformer_impl: str = "local") -> list[str]:
    """The ``MODEL_ARGS`` a preset script would hold for ``spec`` (``scripts/models/gemma4-*.sh`` style;
    ``--make-vocab-size-divisible-by 1`` so that tiny test vocabularies are not padded)."""
    from gemma4.slime.args import PROVIDER_PATH, SPEC_FLAG

    flags = [
        "--num-layers", str(spec.num_layers),
        "--hidden-size", str(spec.hidden_size),
        "--ffn-hidden-size", str(spec.intermediate_size),
        "--num-attention-heads", str(spec.num_attention_heads),
        "--group-query-attention",
        "--num-query-groups", str(spec.num_kv_heads[0]),
        "--kv-channels", str(spec.head_dims[0]),
        "--vocab-size", str(spec.vocab_size),
        "--make-vocab-size-divisible-by", "1",
        "--max-position-embeddings", str(spec.max_position_embeddings),
        "--normalization", "RMSNorm",
        "--norm-epsilon", repr(spec.rms_norm_eps),
        "--qk-layernorm",
        "--disable-bias-linear",
        "--attention-dropout", repr(spec.attention_dropout),
        "--hidden-dropout", "0.0",
        "--no-bias-gelu-fusion",
        "--no-rope-fusion",
        "--transformer-impl", transformer_impl,
        "--spec", *SPEC_FLAG,
        "--custom-model-provider-path", PROVIDER_PATH,
    ]  # fmt: skip
    if not spec.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if spec.enable_moe:
        flags += [
            "--num-experts", str(spec.num_experts),
            "--moe-router-topk", str(spec.top_k_experts),
            "--moe-ffn-hidden-size", str(spec.moe_intermediate_size),
            "--moe-router-load-balancing-type", "none",
        ]  # fmt: skip
    return flags


def provider_model(
    hf_config: Any, dtype: Any, *, transformer_impl: str = "local", **arg_overrides: Any
) -> Any:
    """Our model built the way slime builds it: flags -> Megatron-like args -> ``TransformerConfig`` ->
    :func:`gemma4.slime.model_provider.build_model` (single process; Megatron state initialised here)."""
    from gemma4.config import text_spec_from_any
    from gemma4.runtime import init_single_process
    from gemma4.slime.model_provider import build_model

    init_single_process()
    spec = text_spec_from_any(hf_config)
    args = parse_megatron_flags(
        flags_for_spec(spec, transformer_impl=transformer_impl),
        gemma4_text_spec=spec,  # not hf_config=dict: the converter's cache keys dicts by id()
        bf16=dtype == torch.bfloat16,
        **arg_overrides,
    )
    args.params_dtype = dtype
    config = transformer_config_from_args(args, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    return build_model(args, config)

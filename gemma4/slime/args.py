"""slime's (Megatron-LM's) parsed arguments against the model's ``config.json``.

The model is defined by the ``config.json`` of ``--hf-checkpoint``: Megatron has no flags for Gemma 4's
per-layer attention types, window, full-layer head geometry, dual RoPE or softcap, so the plugin reads those
from the file (:func:`text_spec_from_args`, the same resolution the weight-sync converter uses). The flags
Megatron *does* have (``scripts/models/gemma4-*.sh``) must say the same thing; :func:`check_args` lists
every disagreement, naming the flag and the ``config.json`` field, instead of building a model that is
silently not the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError

SPEC_FLAG = ("gemma4.slime.spec", "get_gemma4_spec")
PROVIDER_PATH = "gemma4.slime.model_provider.model_provider"
_MISSING = object()


@dataclass(frozen=True)
class ArgCheck:
    """One Megatron argument that must agree with the checkpoint config."""

    attr: str  # attribute of Megatron's parsed args
    flag: str  # the command-line flag that sets it
    field: str  # the config.json field (or a description of what it must be)


def text_spec_from_args(args: Any) -> Gemma4TextSpec:
    """The Gemma 4 text spec ``args`` describes: ``args.gemma4_text_spec``, else ``args.hf_config``, else the
    ``config.json`` of ``args.hf_checkpoint`` (read once and cached), as for weight sync."""
    from gemma4.slime.weight_sync import resolve_target

    try:
        spec, _ = resolve_target(args)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"{exc} (slime: pass --hf-checkpoint DIR with the model's config.json)"
        ) from exc
    return spec


def _get(args: Any, attr: str, default: Any = _MISSING) -> Any:
    value = getattr(args, attr, default)
    if value is _MISSING:
        raise InvalidInputError(f"slime args have no {attr!r}; was this called outside Megatron-LM's parser?")
    return value


def effective_query_groups(args: Any) -> int:
    """``--num-query-groups`` as Megatron applies it: the head count unless ``--group-query-attention``."""
    if getattr(args, "group_query_attention", False) and getattr(args, "num_query_groups", None):
        return int(args.num_query_groups)
    return int(_get(args, "num_attention_heads"))


def effective_kv_channels(args: Any) -> int:
    """``--kv-channels`` as Megatron applies it: ``hidden_size // num_attention_heads`` when unset."""
    kv = getattr(args, "kv_channels", None)
    if kv:
        return int(kv)
    return int(_get(args, "hidden_size")) // int(_get(args, "num_attention_heads"))


def expected_values(spec: Gemma4TextSpec) -> dict[str, tuple[ArgCheck, Any]]:
    """What each checked argument must be for ``spec`` (the block defaults are layer 0's geometry, as in
    :func:`gemma4.model.transformer_config.make_transformer_config`)."""
    checks: list[tuple[ArgCheck, Any]] = [
        (ArgCheck("num_layers", "--num-layers", "num_hidden_layers"), spec.num_layers),
        (ArgCheck("hidden_size", "--hidden-size", "hidden_size"), spec.hidden_size),
        (ArgCheck("ffn_hidden_size", "--ffn-hidden-size", "intermediate_size"), spec.intermediate_size),
        (
            ArgCheck("num_attention_heads", "--num-attention-heads", "num_attention_heads"),
            spec.num_attention_heads,
        ),
        (
            ArgCheck(
                "num_query_groups",
                "--group-query-attention --num-query-groups",
                f"the KV heads of layer 0 ({spec.layer_types[0]})",
            ),
            spec.num_kv_heads[0],
        ),
        (
            ArgCheck("kv_channels", "--kv-channels", f"the head dim of layer 0 ({spec.layer_types[0]})"),
            spec.head_dims[0],
        ),
        (ArgCheck("norm_epsilon", "--norm-epsilon", "rms_norm_eps"), spec.rms_norm_eps),
        (ArgCheck("normalization", "--normalization", "RMSNorm (Gemma 4)"), "RMSNorm"),
        (ArgCheck("qk_layernorm", "--qk-layernorm", "q_norm/k_norm (Gemma 4 has them)"), True),
        (ArgCheck("add_bias_linear", "--disable-bias-linear", "no linear biases (Gemma 4)"), False),
        (ArgCheck("add_qkv_bias", "--add-qkv-bias", "attention_bias (false)"), False),
        (ArgCheck("swiglu", "--swiglu", "hidden_activation gelu_pytorch_tanh (GeGLU, not SwiGLU)"), False),
        (
            ArgCheck("apply_layernorm_1p", "--apply-layernorm-1p", "RMSNorm x*w with plain w (not 1 + w)"),
            False,
        ),
        (
            ArgCheck(
                "untie_embeddings_and_output_weights",
                "--untie-embeddings-and-output-weights",
                "tie_word_embeddings",
            ),
            not spec.tie_word_embeddings,
        ),
        (ArgCheck("attention_dropout", "--attention-dropout", "attention_dropout"), spec.attention_dropout),
        (ArgCheck("hidden_dropout", "--hidden-dropout", "no hidden dropout in Gemma 4 (0.0)"), 0.0),
        (
            ArgCheck(
                "window_size", "--window-size", "sliding_window and layer_types (read from config.json)"
            ),
            None,
        ),
        (
            ArgCheck("num_experts", "--num-experts", "num_experts (enable_moe_block)"),
            spec.num_experts if spec.enable_moe else None,
        ),
    ]
    if spec.enable_moe:
        checks += [
            (ArgCheck("moe_router_topk", "--moe-router-topk", "top_k_experts"), spec.top_k_experts),
            (
                ArgCheck("moe_ffn_hidden_size", "--moe-ffn-hidden-size", "moe_intermediate_size"),
                spec.moe_intermediate_size,
            ),
        ]
    return {check.attr: (check, value) for check, value in checks}


#: Megatron-LM's defaults for the flags we check, when ``args`` lacks the attribute (a partial namespace).
MEGATRON_FLAG_DEFAULTS: dict[str, Any] = {
    "normalization": "LayerNorm",
    "qk_layernorm": False,
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "swiglu": False,
    "apply_layernorm_1p": False,
    "untie_embeddings_and_output_weights": False,
    "attention_dropout": 0.1,
    "hidden_dropout": 0.1,
    "window_size": None,
    "num_experts": None,
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": None,
}


#: Where Megatron-LM keeps a checked value. core_v0.16 generates ``--norm-epsilon`` and ``--apply-layernorm-1p``
#: from ``TransformerConfig`` fields, so the parsed attributes are ``layernorm_epsilon`` and
#: ``layernorm_zero_centered_gamma`` (same meaning: ``1 + w``); older Megatron-LM used the flags' names.
ARG_DESTS: dict[str, tuple[str, ...]] = {
    "norm_epsilon": ("norm_epsilon", "layernorm_epsilon"),
    "apply_layernorm_1p": ("apply_layernorm_1p", "layernorm_zero_centered_gamma"),
}
_REQUIRED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "norm_epsilon")


def _actual(args: Any, attr: str) -> Any:
    if attr == "num_query_groups":
        return effective_query_groups(args)
    if attr == "kv_channels":
        return effective_kv_channels(args)
    names = ARG_DESTS.get(attr, (attr,))
    present = [name for name in names if hasattr(args, name)]
    if present:
        return getattr(args, present[0])
    if attr in _REQUIRED:
        return _get(args, attr)  # raises, naming it
    return MEGATRON_FLAG_DEFAULTS.get(attr)


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(actual, float):
        try:
            return (
                actual is not None
                and expected is not None
                and abs(float(actual) - float(expected)) <= 1e-12 * max(1.0, abs(float(expected)))
            )
        except (TypeError, ValueError):
            return False
    if isinstance(expected, bool):
        return bool(actual) == expected
    return actual == expected


def check_args(args: Any, spec: Gemma4TextSpec) -> list[str]:
    """Every disagreement between Megatron's parsed ``args`` and ``spec`` (empty list: they agree)."""
    problems: list[str] = []
    for attr, (check, expected) in expected_values(spec).items():
        actual = _actual(args, attr)
        if not _same(actual, expected):
            problems.append(
                f"{check.flag}: args.{attr} is {actual!r}; config.json ({check.field}) needs {expected!r}"
            )
    vocab = getattr(args, "padded_vocab_size", None) or getattr(args, "vocab_size", None)
    if vocab is not None and int(vocab) != spec.vocab_size:
        problems.append(
            f"--vocab-size / --make-vocab-size-divisible-by: Megatron's (padded) vocabulary is {vocab}; "
            f"config.json vocab_size is {spec.vocab_size} (padding rows would not exist in HF or SGLang)"
        )
    return problems


def require_matching_args(args: Any, spec: Gemma4TextSpec) -> None:
    """Raise :class:`InvalidInputError` listing every flag that disagrees with the checkpoint config."""
    problems = check_args(args, spec)
    if problems:
        source = getattr(args, "hf_checkpoint", None) or "the model config"
        raise InvalidInputError(
            f"slime flags disagree with {source}: "
            + "; ".join(problems)
            + " (see scripts/models/gemma4-*.sh)"
        )

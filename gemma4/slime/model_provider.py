"""``--custom-model-provider-path gemma4.slime.model_provider.model_provider``: builds ``Gemma4Model``.

slime calls ``model_provider(pre_process=..., post_process=..., vp_stage=...)`` in every training actor;
the provider reads Megatron-LM's global arguments (``megatron.training.get_args``) and the
``TransformerConfig`` Megatron derives from them (``core_transformer_config_from_args``), exactly as slime's
own provider does. The model is :class:`gemma4.model.gpt_model.Gemma4Model`, the class the CPU parity gate
checks against HF: embedding × bf16(√H), dual RoPE computed from ``config.json`` (sliding: default θ; full:
proportional, 25 % of the pairs), per-layer ``layer_scalar`` buffers, tied head and ``30·tanh(z/30)``.

After building the model the provider installs the slime hooks (:func:`gemma4.slime.hooks.install`:
weight-sync converter, HF loader, loss-mask type) in this process; ``GEMMA4_SLIME_HOOKS=0`` skips that.

**``router.scale`` is frozen** (``requires_grad=False``) in MoE models built here, unless
``GEMMA4_TRAIN_ROUTER_SCALE=1`` (or ``args.gemma4_train_router_scale``) opts in: SGLang 0.5.23 folds
``scale * H^-0.5`` into its router norm once, at first use (``sglang/srt/models/gemma4_causal.py``
``Gemma4Router.fuse_scale`` lines 203-207, called from ``forward`` lines 211-212 while ``_scale_fused`` is
False), so a trained ``router.scale`` never reaches the rollouts. Weight sync refuses a changed one
(:func:`gemma4.slime.weight_sync.check_router_scale`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gemma4.errors import InvalidInputError
from gemma4.slime.args import SPEC_FLAG

log = logging.getLogger(__name__)


def megatron_args_and_config() -> tuple[Any, Any]:
    """Megatron-LM's parsed arguments and the ``TransformerConfig`` built from them (slime's process only)."""
    try:
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args
    except ImportError as exc:
        raise InvalidInputError(
            "gemma4.slime.model_provider.model_provider runs inside slime's Megatron-LM training actors "
            f"(megatron.training is not importable here: {exc})"
        ) from exc
    args = get_args()
    return args, core_transformer_config_from_args(args)


def build_model(
    args: Any,
    config: Any,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> Any:
    """``Gemma4Model`` for these arguments and Megatron config (``config`` gains the Gemma 4 fields)."""
    from gemma4.model.gpt_model import Gemma4Model
    from gemma4.slime.spec import build_block_spec

    chosen = getattr(args, "spec", None)
    if chosen and tuple(chosen) != SPEC_FLAG:
        raise InvalidInputError(
            f"--spec {' '.join(chosen)} conflicts with the Gemma 4 model provider; use --spec {' '.join(SPEC_FLAG)}"
        )
    block = build_block_spec(args, config, vp_stage)
    spec = config.gemma4
    return Gemma4Model(
        config,
        block,
        vocab_size=spec.vocab_size,
        max_sequence_length=getattr(args, "max_position_embeddings", None) or spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        vp_stage=vp_stage,
    )


TRAIN_ROUTER_SCALE_ENV = "GEMMA4_TRAIN_ROUTER_SCALE"
ROUTER_SCALE_SUFFIX = "mlp.router.scale"


def train_router_scale(args: Any) -> bool:
    """The opt-in to train ``router.scale``: ``args.gemma4_train_router_scale`` or ``$GEMMA4_TRAIN_ROUTER_SCALE=1``."""
    return bool(getattr(args, "gemma4_train_router_scale", False)) or os.environ.get(
        TRAIN_ROUTER_SCALE_ENV, "0"
    ) not in ("", "0")


def freeze_router_scale(model: Any) -> list[str]:
    """Set ``requires_grad=False`` on every MoE ``router.scale``; returns the parameter names frozen."""
    frozen = []
    for name, param in model.named_parameters():
        if name.endswith(ROUTER_SCALE_SUFFIX):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None) -> Any:
    """slime's custom model provider hook (signature ``(pre_process, post_process, vp_stage=None)``)."""
    args, config = megatron_args_and_config()
    model = build_model(args, config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    if not train_router_scale(args):
        frozen = freeze_router_scale(model)
        if frozen:
            log.info(
                "gemma4: froze %d router.scale parameters (SGLang 0.5.23 folds router.scale once; "
                "%s=1 trains them)",
                len(frozen),
                TRAIN_ROUTER_SCALE_ENV,
            )
    if os.environ.get("GEMMA4_SLIME_HOOKS", "1") != "0":
        from gemma4.slime.hooks import install

        installed = install()
        if installed:
            log.info("gemma4: slime hooks installed: %s", "; ".join(installed))
    return model

"""The real ``megatron.training`` (Megatron-LM ``core_v0.16.1``) for providers that call ``get_args()``.

Megatron-Core's wheel ships ``megatron.core`` only; ``megatron.training`` lives in Megatron-LM, whose copy is
read where it lives (``shared/reference/megatron-lm``), never copied. Its package ``__init__`` pulls in the
whole trainer (``training.py`` -> ``megatron.rl``, triton kernels...), so :func:`megatron_training`
installs ``megatron.training`` as a bare package over that directory (its ``__init__.py`` is not run) and
imports the real submodules a provider needs: ``global_vars`` (``get_args``, ``set_args``...) and
``arguments`` (``core_transformer_config_from_args``, ``add_megatron_arguments``...), re-exporting
``__init__``'s names from ``global_vars``. The one dependency stubbed is ``six`` (imported by the BERT
tokenizer that ``global_vars`` imports, used only to build tokenizers), and only if it is not installed.

Everything is installed in ``sys.modules`` only within the context manager and removed on exit (as are the
args). :func:`parse_megatron_args` builds an args namespace with Megatron's own parser from a command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: Re-exported by the real ``megatron/training/__init__.py`` from ``global_vars``.
_GLOBAL_VARS_EXPORTS = (
    "get_args",
    "get_signal_handler",
    "get_tokenizer",
    "get_tensorboard_writer",
    "get_wandb_writer",
    "get_one_logger",
    "get_adlr_autoresume",
    "get_timers",
)


def megatron_lm_dir() -> Path:
    """``shared/reference/megatron-lm`` (raises ``ReferenceDataUnavailable`` if missing)."""
    from harness.reference_data import reference_path

    return reference_path("megatron-lm")


def _stub_six() -> types.ModuleType:
    mod = types.ModuleType("six")
    mod.PY2, mod.PY3 = False, True
    mod.text_type, mod.binary_type, mod.string_types = str, bytes, (str,)
    mod.__harness_stand_in__ = True
    return mod


@contextlib.contextmanager
def megatron_training(args: Any | None = None, *, root: Path | None = None) -> Iterator[types.ModuleType]:
    """Install the real ``megatron.training`` (bare package, see module doc) and, if given, ``args`` as its
    global args; yields the package. On exit ``sys.modules`` and ``megatron.__path__`` are restored."""
    import importlib

    import megatron

    root = Path(root) if root is not None else megatron_lm_dir()
    pkg_dir = root / "megatron"
    before = set(sys.modules)
    saved = {
        k: v for k, v in sys.modules.items() if k == "megatron.training" or k.startswith("megatron.training.")
    }
    old_path = list(megatron.__path__)
    try:
        for k in saved:
            del sys.modules[k]
        if str(pkg_dir) not in megatron.__path__:
            megatron.__path__.append(str(pkg_dir))
        if importlib.util.find_spec("six") is None:
            sys.modules["six"] = _stub_six()
        pkg = types.ModuleType("megatron.training")
        pkg.__path__ = [str(pkg_dir / "training")]
        pkg.__file__ = str(pkg_dir / "training" / "__init__.py")
        pkg.__package__ = "megatron.training"
        pkg.__harness_bare_package__ = True
        sys.modules["megatron.training"] = pkg
        if "megatron.legacy" not in sys.modules:
            # ``megatron`` is a namespace package whose ``__path__`` is recomputed from ``sys.path``, so the
            # entry appended above may vanish: bind ``megatron.legacy`` (a namespace dir in Megatron-LM,
            # imported by training/utils.py) explicitly, like the bare training package.
            legacy = types.ModuleType("megatron.legacy")
            legacy.__path__ = [str(pkg_dir / "legacy")]
            legacy.__package__ = "megatron.legacy"
            sys.modules["megatron.legacy"] = legacy
        gv = importlib.import_module("megatron.training.global_vars")
        for name in _GLOBAL_VARS_EXPORTS:
            setattr(pkg, name, getattr(gv, name))
        pkg.global_vars = gv
        pkg.arguments = importlib.import_module("megatron.training.arguments")
        if args is not None:
            gv.set_args(args)
        yield pkg
    finally:
        for k in set(sys.modules) - before:
            if (
                k == "six"
                or k == "megatron.training"
                or k.startswith("megatron.training.")
                or k.startswith("megatron.legacy")
            ):
                sys.modules.pop(k, None)
        sys.modules.update(saved)
        megatron.__path__[:] = old_path


def parse_megatron_args(
    argv: Sequence[str], *, extra: dict[str, Any] | None = None, params_dtype: Any = None
) -> argparse.Namespace:
    """Megatron-LM's own parser (``add_megatron_arguments``) on ``argv``, plus the fields ``validate_args``
    derives that a model provider reads (``params_dtype``, ``padded_vocab_size``, ``rank``/``world_size``),
    then ``extra`` (a framework's own flags, e.g. slime's ``hf_checkpoint``). Call within
    :func:`megatron_training`."""
    import torch
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(list(argv))
    args.rank = int(os.getenv("RANK", "0"))
    args.world_size = int(os.getenv("WORLD_SIZE", "1"))
    args.params_dtype = params_dtype or (
        torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    )
    if getattr(args, "padded_vocab_size", None) is None:
        args.padded_vocab_size = args.vocab_size
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.kv_channels is None and args.hidden_size is not None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    # validate_args' translations that change the model config:
    if not args.add_bias_linear:
        args.bias_gelu_fusion = False
    if args.add_bias_linear:
        args.add_qkv_bias = True
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.position_embedding_type != "rope":
        args.apply_rope_fusion = False
    if args.seq_length is None:
        args.seq_length = args.max_position_embeddings
    # validate_args (arguments.py: "moe_router_load_balancing_type" / "moe_aux_loss_coeff") turns a
    # one-element list into its element; without it a provider that sets one of the two as a scalar (slime
    # #2135's _apply_moe_config sets moe_aux_loss_coeff = 0.0) trips TransformerConfig's length check.
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(args, name, None)
        if isinstance(value, list) and len(value) == 1:
            setattr(args, name, value[0])
    for k, v in (extra or {}).items():
        setattr(args, k, v)
    return args

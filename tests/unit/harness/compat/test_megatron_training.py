"""The real megatron.training from shared/reference/megatron-lm, installed only within the context."""

from __future__ import annotations

import sys

import pytest


def test_real_get_args_and_config(require_reference):
    root = require_reference("megatron-lm")
    from harness.compat.megatron_training import megatron_training, parse_megatron_args

    with megatron_training(root=root):
        args = parse_megatron_args(
            ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--disable-bias-linear",
             "--use-rotary-position-embeddings", "--no-rope-fusion", "--vocab-size", "32",
             "--max-position-embeddings", "64", "--normalization", "RMSNorm"]
        )  # fmt: skip
    with megatron_training(args, root=root) as pkg:
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args

        assert get_args() is args and pkg.get_args is get_args
        assert str(root) in sys.modules["megatron.training.arguments"].__file__
        cfg = core_transformer_config_from_args(get_args())
        assert cfg.num_layers == 2 and cfg.normalization == "RMSNorm"
    assert "megatron.training" not in sys.modules
    with pytest.raises(ImportError):
        import megatron.training  # noqa: F401

"""Issue 15 item 7: ``router.scale`` in RL with slime + SGLang 0.5.23.

SGLang 0.5.23 folds ``scale * H^-0.5`` into its router norm once, at first use
(``sglang/srt/models/gemma4_causal.py``: ``Gemma4Router.fuse_scale`` lines 203-207, called from ``forward``
lines 210-212 while ``_scale_fused`` is False); a later weight update of ``router.scale`` is loaded into the
parameter but never re-folded. Before: our provider left ``router.scale`` trainable and weight sync sent
every new value silently. After: the provider freezes it unless ``GEMMA4_TRAIN_ROUTER_SCALE=1`` (or
``args.gemma4_train_router_scale``), and weight sync refuses a ``router.scale`` that differs from its first
synced value (``GEMMA4_ALLOW_ROUTER_SCALE_UPDATE=1`` switches that off).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma4.config import text_spec_from_any
from gemma4.errors import InvalidInputError
from gemma4.slime import model_provider as provider_module
from gemma4.slime.weight_sync import convert_gemma4_to_hf
from harness.presets import preset_config_dict
from harness.testing.slime import flags_for_spec, parse_megatron_flags, transformer_config_from_args

SUFFIX = "mlp.router.scale"


def _provider_model(monkeypatch, **overrides):
    from gemma4.runtime import init_single_process

    init_single_process()
    spec = text_spec_from_any(preset_config_dict("tiny-26b-a4b"))
    args = parse_megatron_flags(flags_for_spec(spec), gemma4_text_spec=spec, **overrides)
    config = transformer_config_from_args(args, params_dtype=torch.float32)
    monkeypatch.setattr(provider_module, "megatron_args_and_config", lambda: (args, config))
    monkeypatch.setenv("GEMMA4_SLIME_HOOKS", "0")
    return args, provider_module.model_provider(pre_process=True, post_process=True, vp_stage=None)


def _scales(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(SUFFIX)}


def test_router_scale_frozen_by_default_through_the_provider(monkeypatch):
    monkeypatch.delenv(provider_module.TRAIN_ROUTER_SCALE_ENV, raising=False)
    _, model = _provider_model(monkeypatch)
    scales = _scales(model)
    assert len(scales) == text_spec_from_any(preset_config_dict("tiny-26b-a4b")).num_layers
    assert not any(p.requires_grad for p in scales.values())
    # everything else still trains, per_expert_scale and the router projection included
    others = [n for n, p in model.named_parameters() if not n.endswith(SUFFIX) and not p.requires_grad]
    assert others == []
    assert any(n.endswith("mlp.router.per_expert_scale") for n, _ in model.named_parameters())


@pytest.mark.parametrize("how", ["env", "args"])
def test_router_scale_trainable_with_the_opt_in(monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(provider_module.TRAIN_ROUTER_SCALE_ENV, "1")
        _, model = _provider_model(monkeypatch)
    else:
        monkeypatch.delenv(provider_module.TRAIN_ROUTER_SCALE_ENV, raising=False)
        _, model = _provider_model(monkeypatch, gemma4_train_router_scale=True)
    scales = _scales(model)
    assert scales and all(p.requires_grad for p in scales.values())


def _sync(args, model, prefix="module.module."):
    out = []
    for name, p in model.named_parameters():
        out += convert_gemma4_to_hf(args, prefix + name, p.detach())
    return out


def test_sync_refuses_a_changed_router_scale(monkeypatch):
    monkeypatch.delenv("GEMMA4_ALLOW_ROUTER_SCALE_UPDATE", raising=False)
    monkeypatch.setenv(provider_module.TRAIN_ROUTER_SCALE_ENV, "1")
    args, model = _provider_model(monkeypatch)
    _sync(args, model)  # first sync: the values SGLang folds
    _sync(args, model)  # unchanged: fine
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(SUFFIX):
                p.add_(0.5)  # every other parameter may change
    _sync(args, model)
    name, scale = next(iter(_scales(model).items()))
    with torch.no_grad():
        scale.mul_(1.5)
    with pytest.raises(InvalidInputError, match=r"router\.scale.*SGLang 0\.5\.23") as err:
        _sync(args, model)
    assert name in str(err.value)
    assert "GEMMA4_TRAIN_ROUTER_SCALE" in str(err.value)


def test_sync_check_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("GEMMA4_ALLOW_ROUTER_SCALE_UPDATE", "1")
    args, model = _provider_model(monkeypatch)
    _sync(args, model)
    with torch.no_grad():
        next(iter(_scales(model).values())).mul_(1.5)
    _sync(args, model)


def test_sglang_still_folds_once():
    """The SGLang fact the default rests on, read from the installed 0.5.23 source (skipped without it)."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    try:
        if version("sglang") != "0.5.23":
            pytest.skip(f"sglang {version('sglang')} installed; the fold lines are pinned to 0.5.23")
    except PackageNotFoundError:
        pytest.skip("sglang==0.5.23 is not installed (pip install --no-deps sglang==0.5.23)")
    lines = (
        Path(distribution("sglang").locate_file("sglang/srt/models/gemma4_causal.py"))
        .read_text()
        .splitlines()
    )
    assert lines[202].strip() == "def fuse_scale(self):"
    assert "self.scale * self.root_size" in lines[204]
    assert lines[206].strip() == "self._scale_fused = True"
    assert lines[210].strip() == "if not self._scale_fused:"

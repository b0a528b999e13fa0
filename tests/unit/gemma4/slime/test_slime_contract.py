"""Contracts with slime's own code (commit 624b824a8, imported from ``shared/reference/slime``; skipped with
the reference-data reason when it is absent, failed under ``GEMMA4_REQUIRE_SHARED=1``).

* HF -> Megatron loading (issue 15 item 4): the two lines of slime's ``checkpoint._load_checkpoint_hf``
  (``from …hf_to_megatron import load_hf_weights; load_hf_weights(args, ddp_model, load_path)``) ->
  ``hf_to_megatron.load_hf_weights`` -> ``_LOADERS[config.model_type]`` -> ``common.load_model_hf_weights``
  (walking ``update_weight.common.named_params_and_buffers``), over our Megatron model, with our hook
  installed in the order slime's training actor runs it (model provider first, ``hf_to_megatron`` imported
  lazily afterwards).
* SFT loss masks (item 5): slime's own ``rollout/sft_rollout.generate_rollout`` and ``utils/mask_utils``,
  called through our rollout function ``gemma4.slime.loss_mask.generate_rollout``; ``--loss-mask-type
  gemma4`` through slime's own argument definitions (``utils/arguments.py``).

Stubs (only where the module cannot be imported on this CPU machine; nothing of slime is stubbed or copied):

* ``httpx`` (``AsyncClient``): imported at module level by ``slime/utils/http_utils.py`` (via
  ``update_weight/common.py``); only used in an annotation there.
* for ``slime.utils.arguments`` only (fixture ``slime_arguments``): ``sglang.srt.server_args.ServerArgs``,
  ``sglang_router.launch_router.RouterArgs`` (SGLang; SGLang without its GPU dependencies does not import),
  ``requests``, ``wandb``: module-level imports not used by the argument definitions under test.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from gemma4.config import text_spec_from_any
from gemma4.conversion import mapping
from gemma4.model.build import build_gemma4_model
from harness.presets import preset_config_dict
from harness.testing.conversion import save_hf_checkpoint, stored_tensors, text_relative

HF_TO_MEGATRON = "slime.backends.megatron_utils.hf_to_megatron"


@pytest.fixture
def slime(require_reference, monkeypatch):
    """slime importable from the shared copy; its HF loader modules not yet imported (as in a fresh actor)."""
    root = require_reference("slime")
    monkeypatch.syspath_prepend(str(root))
    if importlib.util.find_spec("httpx") is None:
        httpx = types.ModuleType("httpx")
        httpx.AsyncClient = type("AsyncClient", (), {})
        monkeypatch.setitem(sys.modules, "httpx", httpx)
    for name in [n for n in sys.modules if n == HF_TO_MEGATRON or n.startswith(HF_TO_MEGATRON + ".")]:
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    yield root
    # the real slime modules this test imported must not leak into later tests of this worker (the hook
    # scans every loaded ``slime.*`` module)
    for name in set(sys.modules) - before:
        if name == "slime" or name.startswith("slime."):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """tiny-31b saved by transformers: K=V layers, layer_scalar and every norm drawn away from 1."""
    return save_hf_checkpoint(tmp_path_factory.mktemp("hf") / "hf", preset_config_dict("tiny-31b"), seed=5)


def _args():
    return types.SimpleNamespace(padded_vocab_size=None, num_experts=None)


def _want(hf_dir):
    spec = text_spec_from_any(preset_config_dict("tiny-31b"))
    return spec, mapping.hf_to_mcore(text_relative(stored_tensors(hf_dir)), spec)


def _failures(model, want) -> list[str]:
    got = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    failures = [f"missing {k}" for k in sorted(set(want) - set(got))]
    return failures + [k for k in sorted(want) if k in got and not torch.equal(got[k], want[k])]


def test_slime_hf_loader_loads_gemma4_with_layer_scalar(slime, hf_dir):
    """The hook runs first (our model provider), slime imports ``hf_to_megatron`` later: the real loader
    must still know Gemma 4 and must write ``layer_scalar``. Before: ``ValueError: Unsupported
    HuggingFace model type: gemma4_text`` (hf_to_megatron/__init__.py:42), and with the loader registered
    by hand every ``layer_scalar`` stayed 1.0 (common.py:155 walks parameters + ``expert_bias`` only)."""
    from gemma4.slime import hooks

    spec, want = _want(hf_dir)
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in want.items() if k.endswith("layer_scalar"))
    model = build_gemma4_model(spec, torch.float32)
    done = hooks.install()  # what our model provider does in the training actor
    assert any("_LOADERS" in line for line in done) and any("load_hf_weights" in line for line in done)
    # slime's checkpoint.py:129-131 (_load_checkpoint_hf), verbatim; checkpoint.py itself needs
    # megatron.training.checkpointing, which is not importable on CPU here
    from slime.backends.megatron_utils.hf_to_megatron import load_hf_weights

    load_hf_weights(_args(), [model], str(hf_dir))
    assert _failures(model, want) == []
    hf_to_megatron = sys.modules[HF_TO_MEGATRON]
    assert hf_to_megatron.supports_hf_weight_loading(str(hf_dir))


def test_slime_walk_alone_leaves_layer_scalar_at_one(slime, hf_dir):
    """What slime's unpatched walk does with our loader: every tensor but ``layer_scalar`` right; the proof
    that the buffer step is needed (and that the comparison above would see it)."""
    import slime.backends.megatron_utils.hf_to_megatron as hf_to_megatron
    from transformers import AutoConfig

    from gemma4.slime.loader import gemma4_hf_tensor

    spec, want = _want(hf_dir)
    model = build_gemma4_model(spec, torch.float32)
    with pytest.raises(ValueError, match="Unsupported HuggingFace model type"):
        hf_to_megatron.load_hf_weights(_args(), [model], str(hf_dir))  # before install: unsupported
    config = AutoConfig.from_pretrained(str(hf_dir))
    hf_to_megatron.load_model_hf_weights(_args(), [model], str(hf_dir), config, gemma4_hf_tensor)
    bad = _failures(model, want)
    assert bad and all(k.endswith("layer_scalar") for k in bad)


MESSAGES = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]


def test_slime_sft_rollout_builds_gemma4_masks(slime, tmp_path, monkeypatch):
    """slime's own SFT rollout (rollout/sft_rollout.py) run through ``--rollout-function-path
    gemma4.slime.loss_mask.generate_rollout`` in a process where no hook was installed before. Before:
    ``MultiTurnLossMaskGenerator(tok, tokenizer_type="gemma4").get_loss_mask`` raised ``ValueError:
    Unsupported tokenizer type`` (mask_utils.py:242) in the rollout actor."""
    from slime.rollout import sft_rollout
    from slime.utils.mask_utils import MultiTurnLossMaskGenerator
    from slime.utils.processing_utils import load_tokenizer
    from slime.utils.types import Sample

    from gemma4.slime.loss_mask import Gemma4LossMaskGenerator, generate_rollout
    from harness.assets import load_gemma4_chat_template
    from harness.testing.chat import build_test_tokenizer

    tok_dir = build_test_tokenizer(tmp_path / "tok", chat_template=load_gemma4_chat_template())
    tokenizer = load_tokenizer(str(tok_dir))
    if not getattr(MultiTurnLossMaskGenerator, "gemma4_hook", False):
        with pytest.raises(ValueError, match="Unsupported tokenizer type"):
            MultiTurnLossMaskGenerator(tokenizer, tokenizer_type="gemma4").get_loss_mask(MESSAGES)
    for name in ("TOKENIZER", "PROCESSOR", "MASK_GENERATOR"):
        monkeypatch.setattr(sft_rollout, name, None)
    monkeypatch.setattr(sft_rollout, "MultiTurnLossMaskGenerator", sft_rollout.MultiTurnLossMaskGenerator)

    class Buffer:
        def get_samples(self, n):
            return [[Sample(prompt=MESSAGES, metadata={})] for _ in range(n)]

    args = types.SimpleNamespace(
        rollout_global_dataset=True, hf_checkpoint=str(tok_dir), rollout_batch_size=1, loss_mask_type="qwen"
    )
    ((sample,),) = generate_rollout(args, 0, Buffer())
    ids, mask = Gemma4LossMaskGenerator(tokenizer).get_loss_mask(MESSAGES)
    assert sample.tokens == ids and sum(mask) > 0
    assert sample.loss_mask == mask[-sample.response_length :]
    assert args.loss_mask_type == "qwen"  # the caller's args are not modified


def _stub_module(monkeypatch, name: str, **attrs) -> None:
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        sub = ".".join(parts[:k])
        module = types.ModuleType(sub)
        module.__path__ = []
        monkeypatch.setitem(sys.modules, sub, module)
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


@pytest.fixture
def slime_arguments(slime, monkeypatch):
    """``slime.utils.arguments`` (slime's own parser definitions). Stubbed, only where not importable here:
    ``sglang.srt.server_args.ServerArgs`` and ``sglang_router.launch_router.RouterArgs`` (SGLang; used
    only when slime parses SGLang's flags, not by the definitions tested), ``httpx``, ``requests``,
    ``wandb`` (imported at module level by slime's utilities, unused by argument definitions). The slime
    modules imported here are dropped afterwards, so no later test sees the stubs."""
    before = set(sys.modules)
    for name, attrs in (
        ("sglang.srt.server_args", {"ServerArgs": type("ServerArgs", (), {})}),
        ("sglang_router.launch_router", {"RouterArgs": type("RouterArgs", (), {})}),
        ("httpx", {"AsyncClient": type("AsyncClient", (), {})}),
        ("requests", {}),
        ("wandb", {}),
    ):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not installed, or (SGLang without its GPU deps) not importable
            _stub_module(monkeypatch, name, **attrs)
    try:
        yield importlib.import_module("slime.utils.arguments")
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("slime."):
                del sys.modules[name]


def test_loss_mask_type_gemma4_through_slimes_parser(slime_arguments):
    """slime's own argument definitions (``get_slime_extra_args_provider``, what ``parse_args`` builds its
    parser with). Before (and still with the stock ``train.py``, which passes no custom hook):
    ``--loss-mask-type gemma4`` -> ``invalid choice`` (arguments.py:1416-1420). With
    ``parse_args(add_custom_arguments=gemma4.slime.loss_mask.add_arguments)``: accepted."""
    import argparse

    from gemma4.slime.loss_mask import add_arguments

    base = ["--rollout-batch-size", "1", "--loss-mask-type"]
    stock = argparse.ArgumentParser()
    slime_arguments.get_slime_extra_args_provider()(stock)
    with pytest.raises(SystemExit):
        stock.parse_known_args([*base, "gemma4"])
    ours = argparse.ArgumentParser()
    slime_arguments.get_slime_extra_args_provider(add_arguments)(ours)
    assert ours.parse_known_args([*base, "gemma4"])[0].loss_mask_type == "gemma4"
    assert ours.parse_known_args([*base, "qwen3"])[0].loss_mask_type == "qwen3"
    with pytest.raises(SystemExit):
        ours.parse_known_args([*base, "nope"])


def test_weight_sync_names_experts_globally_through_slimes_own_walk(slime, monkeypatch):
    """slime's ``_named_params_and_buffers_global`` makes expert indices global only for TE's grouped names:
    after ``install`` the walk every sync path uses (``named_params_and_buffers`` looks it up at call time) is
    wrapped so our SequentialMLP experts get global indices (EP rank 1 of 2 holds experts 4..7 of 8)."""
    from megatron.core import parallel_state as mpu

    from gemma4.slime.hooks import install

    common = importlib.import_module("slime.backends.megatron_utils.update_weight.common")
    current = common._named_params_and_buffers_global
    original = getattr(
        current, "__wrapped__", current
    )  # slime's own function (an earlier test may have installed)
    monkeypatch.setattr(common, "_named_params_and_buffers_global", original)  # restored after the test
    install()
    wrapped = common._named_params_and_buffers_global
    assert getattr(wrapped, "gemma4_hook", False) and wrapped.__wrapped__ is original
    monkeypatch.setattr(mpu, "get_expert_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(mpu, "get_expert_model_parallel_rank", lambda: 1)
    local = "module.module.decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"
    from gemma4.slime.weight_sync import with_global_expert_names

    walk = with_global_expert_names(lambda args, model: iter([(local, torch.zeros(1))]))
    ((name, _),) = list(walk(types.SimpleNamespace(num_experts=8), []))
    assert name == "module.module.decoder.layers.0.mlp.experts.linear_fc1.weight5"

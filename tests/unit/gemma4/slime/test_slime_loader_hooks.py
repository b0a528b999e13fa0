"""The HF -> Megatron loader (slime's ``_LOADERS`` shape), the loss-mask hook and the slime hook installer."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from gemma4.config import hf_text_config_from_any, text_spec_from_any
from gemma4.conversion.mapping import hf_to_mcore
from gemma4.errors import InvalidInputError
from gemma4.model.build import build_gemma4_model
from gemma4.slime.loader import LOADERS, gemma4_hf_tensor
from harness.presets import preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict


def _checkpoint(preset: str, prefix: str = "model."):
    cfg = preset_config_dict(preset)
    rel = hf_text_state_dict(build_reference_model(hf_text_config_from_any(cfg), torch.float32, seed=3))
    full = {(k if k == "lm_head.weight" else prefix + k): v for k, v in rel.items()}
    return cfg, rel, full


class _GetTensor:  # safetensors.safe_open's interface
    def __init__(self, tensors):
        self._t = tensors

    def keys(self):
        return list(self._t)

    def get_tensor(self, name):
        return self._t[name]


def _te_grouped(name: str) -> str:
    """``…experts.local_experts.{e}.linear_fc1.weight`` -> TE's ``…experts.linear_fc1.weight{e}``."""
    head, _, rest = name.partition(".local_experts.")
    e, _, tail = rest.partition(".")
    return f"{head}.{tail}{e}"


@pytest.mark.parametrize(
    ("preset", "prefix", "reader_kind"),
    [
        ("tiny-31b", "model.", "mapping"),
        ("tiny-12b", "model.language_model.", "get_tensor"),
        ("tiny-26b-a4b", "model.", "callable"),
        ("tiny-e2b", "model.", "mapping"),
    ],
)
def test_loader_equals_the_mapping_table(preset, prefix, reader_kind):
    """For every tensor of our model: the loader's tensor is hf_to_mcore's, bit for bit. Catches a wrong prefix,
    a wrong expert index, a QKV/fc1 transform skipped, a buffer (layer_scalar) forgotten."""
    cfg, rel, full = _checkpoint(preset, prefix)
    spec = text_spec_from_any(cfg)
    want = hf_to_mcore(rel, spec)
    reader = {"mapping": full, "get_tensor": _GetTensor(full), "callable": full.__getitem__}[reader_kind]
    config = {"model_type": "gemma4", "text_config": cfg} if prefix != "model." else cfg
    names = [
        n for n in build_gemma4_model(spec, torch.float32).state_dict() if not n.endswith("_extra_state")
    ]
    assert set(names) == set(want)
    for name in names:
        got = gemma4_hf_tensor("module." + name, reader, config)
        assert torch.equal(got, want[name]), name
        if ".local_experts." in name:
            assert torch.equal(gemma4_hf_tensor(_te_grouped(name), reader, config), want[name])
    assert (
        gemma4_hf_tensor("module.decoder.layers.0.self_attention.linear_qkv._extra_state", reader, config)
        is None
    )


def test_loader_prefix_comes_from_the_readers_names():
    cfg, rel, full = _checkpoint("tiny-31b", "model.language_model.")
    name = "embedding.word_embeddings.weight"
    assert torch.equal(gemma4_hf_tensor(name, full, cfg), rel["embed_tokens.weight"])  # keys say CG
    with pytest.raises(InvalidInputError, match="'model.embed_tokens.weight' is missing"):
        gemma4_hf_tensor(name, full.__getitem__, cfg)  # no keys(): the text config says CausalLM


def test_loader_tied_output_layer_is_the_embedding_and_errors_are_named():
    cfg, rel, full = _checkpoint("tiny-12b")
    assert torch.equal(gemma4_hf_tensor("output_layer.weight", full, cfg), rel["embed_tokens.weight"])
    with pytest.raises(InvalidInputError, match="no HF source.*decoder.layers.0.nope"):
        gemma4_hf_tensor("decoder.layers.0.nope", full, cfg)
    partial = {k: v for k, v in full.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(InvalidInputError, match="'model.layers.1.self_attn.k_proj.weight' is missing"):
        gemma4_hf_tensor("decoder.layers.1.self_attention.linear_qkv.weight", partial, cfg)
    moe_cfg, _, moe_full = _checkpoint("tiny-26b-a4b")
    with pytest.raises(InvalidInputError, match="names expert 8"):
        gemma4_hf_tensor("decoder.layers.0.mlp.experts.local_experts.8.linear_fc1.weight", moe_full, moe_cfg)
    assert set(LOADERS) >= {"gemma4", "gemma4config", "gemma4forcausallm"}


def test_expert_reads_are_cached_per_fused_tensor():
    cfg, _, full = _checkpoint("tiny-26b-a4b")
    reads = []

    def reader(name):
        reads.append(name)
        return full[name]

    for e in range(8):
        gemma4_hf_tensor(f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc1.weight", reader, cfg)
    assert reads == ["model.layers.2.experts.gate_up_proj"]


# ---- loss mask ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from gemma4.chat.tokenizer import load_tokenizer
    from harness.testing.chat import build_test_tokenizer

    return load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))


MESSAGES = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]


def test_loss_mask_type_gemma4_is_ours(tokenizer):
    from gemma4.slime.loss_mask import Gemma4LossMaskGenerator, dispatching_class, make_loss_mask_generator
    from harness.assets import load_gemma4_chat_template

    template = load_gemma4_chat_template()  # the project's own Gemma 4 template: any Gemma 4 template will do
    generator = make_loss_mask_generator(tokenizer, "gemma4", chat_template=template)
    want = Gemma4LossMaskGenerator(tokenizer, "gemma4", chat_template=template).get_loss_mask(MESSAGES)
    assert generator.get_loss_mask(MESSAGES) == want and sum(want[1]) > 0

    class SlimeGenerator:  # slime's MultiTurnLossMaskGenerator shape
        def __init__(self, tokenizer, tokenizer_type="qwen"):
            self.tokenizer_type = tokenizer_type

    hooked = dispatching_class(SlimeGenerator)
    assert isinstance(hooked(tokenizer, tokenizer_type="gemma4"), Gemma4LossMaskGenerator)
    other = hooked(tokenizer, tokenizer_type="qwen")
    assert isinstance(other, SlimeGenerator) and other.tokenizer_type == "qwen"


# ---- hooks ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_slime(monkeypatch):
    """Three modules laid out like slime's: the converter dispatcher, the mask utils, and a consumer that
    imported both by name (``from … import …``)."""

    def convert_to_hf(args, model_name, name, param, quantization_config=None):
        return [("slime-original", param)]

    class MultiTurnLossMaskGenerator:
        def __init__(self, tokenizer, tokenizer_type="qwen"):
            self.tokenizer_type = tokenizer_type

    # only the fakes are slime here: real slime modules another test of this worker loaded are hidden
    for name in [n for n in sys.modules if n == "slime" or n.startswith("slime.")]:
        monkeypatch.delitem(sys.modules, name)
    mods = {}
    for name in (
        "slime",
        "slime.backends.megatron_utils.megatron_to_hf",
        "slime.utils.mask_utils",
        "slime.consumer",
    ):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    convert_to_hf.__module__ = "slime.backends.megatron_utils.megatron_to_hf"
    MultiTurnLossMaskGenerator.__module__ = "slime.utils.mask_utils"
    mods["slime.backends.megatron_utils.megatron_to_hf"].convert_to_hf = convert_to_hf
    mods["slime.backends.megatron_utils.megatron_to_hf"]._LOADERS = {"qwen3": object()}
    mods["slime.utils.mask_utils"].MultiTurnLossMaskGenerator = MultiTurnLossMaskGenerator
    mods["slime.consumer"].convert_to_hf = convert_to_hf
    mods["slime.consumer"].MultiTurnLossMaskGenerator = MultiTurnLossMaskGenerator
    return mods


def test_hooks_route_slimes_dispatch_to_gemma4(fake_slime, tokenizer):
    from gemma4.slime.hooks import install
    from gemma4.slime.loss_mask import Gemma4LossMaskGenerator

    done = install(import_known=False)
    assert len(done) == 5, done  # two converter bindings, two generator bindings, the loaders
    conv = fake_slime["slime.backends.megatron_utils.megatron_to_hf"]
    assert fake_slime["slime.consumer"].convert_to_hf is conv.convert_to_hf  # one wrapper for one original
    p = torch.ones(3)
    assert conv.convert_to_hf(None, "qwen3config", "x", p) == [("slime-original", p)]
    spec = text_spec_from_any(preset_config_dict("tiny-31b"))
    args = types.SimpleNamespace(gemma4_text_spec=spec)
    norm = torch.ones(spec.hidden_size)
    assert conv.convert_to_hf(args, "gemma4config", "decoder.final_layernorm.weight", norm) == [
        ("model.norm.weight", norm)
    ]
    assert conv._LOADERS["gemma4"] is gemma4_hf_tensor and "qwen3" in conv._LOADERS
    gen = fake_slime["slime.consumer"].MultiTurnLossMaskGenerator
    assert isinstance(gen(tokenizer, tokenizer_type="gemma4"), Gemma4LossMaskGenerator)
    assert install(import_known=False) == []  # idempotent


def test_hooks_without_slime_do_nothing():
    from gemma4.slime.hooks import install

    assert install(modules=[]) == []

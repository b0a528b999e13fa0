"""Issue 15 item 6: SGLang 0.5.23 starts from our HF export (``convert mcore-to-hf --for sglang``), run with
SGLang's **own code** on CPU.

What runs (all of it SGLang's, imported by :mod:`harness.testing.sglang_cpu`; nothing of SGLang is copied):

* ``sglang.srt.configs.model_config.ModelConfig(<export dir>)`` -- the config object SGLang's server builds
  from ``--model-path``: its ``get_config`` (``srt/utils/hf_transformers/config.py``:
  ``HfModelConfigParser.parse``, whose lines 311-312 flatten Gemma 4's per-layer head dims for the
  ``_GEMMA4_MODEL_TYPES`` of lines 66-73 through ``_apply_gemma4_attention_overrides``, lines 115-153),
  ``get_hf_text_config`` and the head-dim / KV-head reads (``configs/model_config.py`` from line 1341);
* SGLang's ``Gemma4ForConditionalGeneration`` (``models/gemma4_mm.py``, the export's architecture, with the
  export's config as ``ModelConfig`` made it: transformers' default vision tower included) and its real
  ``load_weights`` on the exported safetensors, every ``weight_loader`` call recorded, every parameter
  NaN-filled first: no tensor skipped, no slot written twice, every text parameter holding the source
  checkpoint's values in SGLang's layout (:func:`~harness.testing.sglang_cpu.load_and_check`); the per-layer
  head dim / KV heads SGLang's attention layers were built with (``gemma4_causal.py`` lines 569-571).

Before (and still the default ``--for hf``): the export is a ``gemma4_text`` config with a
``per_layer_config`` (transformers >= 5.15 schema). ``gemma4_text`` is not among SGLang's Gemma 4 model types,
and ``HfModelConfigParser.parse`` already dies copying the text config's attributes onto the config
(line 267, ``hasattr(config, key)``): transformers refuses the global ``num_key_value_heads`` of a
heterogeneous text config with ``AmbiguousGlobalPerLayerAttributeError`` (a ``RuntimeError``, which
``hasattr`` does not absorb). After: ``--for sglang`` writes the ``gemma4`` wrapper
(``Gemma4ForConditionalGeneration``, ``text_config``, weights under ``model.language_model.``).

Planted faults (each red, kept as tests): the ``--for hf`` config written into the SGLang export (SGLang's
config loader refuses it again), and the export's weights without the ``model.language_model.`` prefix
(SGLang's ``load_weights`` strips ``model.`` and skips every text tensor, leaving its parameters unwritten).

Stubs: those of :mod:`harness.testing.sglang_cpu` (:data:`~harness.testing.sglang_cpu.STUBS`):
``sgl_kernel`` (SGLang's compiled CUDA-kernel package; its attributes raise if called, and the tests assert
none was) and ``torchvision`` (PyPI's wheel is a CUDA build; stubbed only while SGLang's modules import).
When SGLang is not importable the SGLang tests skip with the install line (fail under
``GEMMA4_REQUIRE_SHARED=1``).
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gemma4.config import hf_text_config_from_any, text_spec_from_any
from gemma4.conversion.convert import hf_to_mcore_dir, mcore_to_hf_dir
from gemma4.conversion.hf_io import open_hf_checkpoint
from gemma4.errors import InvalidInputError
from harness.presets import preset_config_dict
from harness.testing import sglang_cpu
from harness.testing.conversion import save_hf_checkpoint, stored_tensors, text_relative

pytestmark = pytest.mark.xdist_group("sglang-cpu")

PRESETS = ("tiny-31b", "tiny-26b-a4b")
SGLANG_CONFIG_PY = "sglang/srt/utils/hf_transformers/config.py"


@pytest.fixture(scope="module")
def sglang() -> dict[str, types.ModuleType]:
    return sglang_cpu.require_sglang()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny-31b (sliding head dim 16, full 32; K=V full layers) and tiny-26b-a4b: HF -> Megatron, and both
    exports."""
    out = {}
    for name in PRESETS:
        root = tmp_path_factory.mktemp(name)
        hf = save_hf_checkpoint(root / "hf", preset_config_dict(name), torch.float32)
        hf_to_mcore_dir(hf, root / "mc")
        mcore_to_hf_dir(root / "mc", root / "plain")
        mcore_to_hf_dir(root / "mc", root / "sglang", target="sglang")
        out[name] = (hf, root)
    return out


def model_config(sglang: dict[str, types.ModuleType], directory: Path):
    """SGLang's ``ModelConfig`` of ``directory`` (what ``--model-path directory`` gives the server)."""
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig(str(directory), trust_remote_code=False)


@pytest.fixture(scope="module")
def sglang_models(sglang, exported):
    """Per preset: SGLang's ``ModelConfig`` of the ``--for sglang`` export and the
    ``Gemma4ForConditionalGeneration`` SGLang builds from it (float32, CPU)."""
    out = {}
    for name in PRESETS:
        mc = model_config(sglang, exported[name][1] / "sglang")
        model = sglang_cpu.build_sglang_model({}, "conditional", config=mc.hf_config)
        out[name] = (mc, model)
    return out


def _want(name: str) -> tuple[list[int], list[int]]:
    spec = text_spec_from_any(preset_config_dict(name))
    types_ = preset_config_dict(name)["layer_types"]
    return [spec.head_dim_of(t) for t in types_], [spec.kv_heads_of(t) for t in types_]


def _source(hf: Path, name: str) -> tuple[dict[str, torch.Tensor], object]:
    """The source HF checkpoint's text weights as ``model.X`` and its HF text config."""
    cfg = hf_text_config_from_any(preset_config_dict(name))
    full = {
        (k if k == "lm_head.weight" else "model." + k): v
        for k, v in text_relative(stored_tensors(hf)).items()
    }
    if cfg.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    return full, cfg


def _raised_in_sglangs_config_loader(excinfo: pytest.ExceptionInfo) -> bool:
    return any(str(entry.path).endswith(SGLANG_CONFIG_PY) for entry in excinfo.traceback)


def test_plain_export_is_refused_by_sglangs_config_loader(exported, sglang):
    """Before (and still the default ``--for hf``): SGLang's own ``ModelConfig`` / ``get_config`` fail on the
    ``gemma4_text`` export, inside SGLang's config parser."""
    from transformers.integrations.heterogeneity.configuration_utils import (
        AmbiguousGlobalPerLayerAttributeError,
    )

    _, root = exported["tiny-31b"]
    assert json.loads((root / "plain" / "config.json").read_text())["model_type"] == "gemma4_text"
    assert "gemma4_text" not in sglang["config"]._GEMMA4_MODEL_TYPES
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError, match="per-layer attribute") as excinfo:
        model_config(sglang, root / "plain")
    assert _raised_in_sglangs_config_loader(excinfo)
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        sglang["config"].get_config(str(root / "plain"), trust_remote_code=False)


@pytest.mark.parametrize("name", PRESETS)
def test_sglang_model_config_flattens_the_export(sglang_models, name):
    """SGLang's ``ModelConfig`` of the export: the wrapper architecture, the flattened head dims (full
    ``head_dim``, sliding ``swa_head_dim``), and SGLang's attention layers built with each layer's head dim
    and KV heads."""
    mc, model = sglang_models[name]
    spec = text_spec_from_any(preset_config_dict(name))
    want_dims, want_kv = _want(name)
    assert len(set(want_dims)) == 2  # full layers' head dim differs from sliding ones'
    assert mc.hf_config.architectures == ["Gemma4ForConditionalGeneration"]
    assert mc.hf_config.model_type == "gemma4"
    assert mc.head_dim == spec.head_dim_of("full_attention")
    assert mc.hf_text_config.swa_head_dim == spec.head_dim_of("sliding_attention")
    assert mc.num_hidden_layers == len(want_dims) and mc.hidden_size == spec.hidden_size
    layers = model.language_model.layers
    assert [layer.self_attn.head_dim for layer in layers] == want_dims
    assert [layer.self_attn.total_num_kv_heads for layer in layers] == want_kv


@pytest.mark.parametrize("name", PRESETS)
def test_sglang_load_weights_takes_every_exported_tensor(exported, sglang_models, sglang, name):
    """SGLang's own ``load_weights`` on the exported safetensors: nothing skipped, nothing written twice,
    every text parameter holds the source checkpoint's values (in SGLang's fused layout)."""
    hf, root = exported[name]
    _, model = sglang_models[name]
    full, cfg = _source(hf, name)
    weights = stored_tensors(root / "sglang")
    record, failures = sglang_cpu.load_and_check(model, "conditional", full, cfg, weights.items())
    assert failures == []
    assert record.skipped == [] and {emitted for emitted, *_ in record.calls} == set(weights)
    assert sglang["sgl_kernel"].called == []


def test_planted_hf_config_in_the_sglang_export_is_refused(exported, sglang, tmp_path):
    """Planted: the ``--for hf`` config written into the SGLang export (weights unchanged): red again, in
    SGLang's config loader."""
    from transformers.integrations.heterogeneity.configuration_utils import (
        AmbiguousGlobalPerLayerAttributeError,
    )

    _, root = exported["tiny-31b"]
    bad = shutil.copytree(root / "sglang", tmp_path / "sglang-with-hf-config")
    shutil.copy(root / "plain" / "config.json", bad / "config.json")
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError) as excinfo:
        model_config(sglang, bad)
    assert _raised_in_sglangs_config_loader(excinfo)


def test_planted_export_without_language_model_prefix_is_red(exported, sglang_models, tmp_path):
    """Planted: the export's weights under ``model.`` instead of ``model.language_model.``. SGLang's
    ``Gemma4ForConditionalGeneration.load_weights`` strips ``model.`` and finds no parameter: it skips every
    text tensor (no error of its own), and the check names them and the unwritten parameters."""
    hf, root = exported["tiny-31b"]
    _, model = sglang_models["tiny-31b"]
    full, cfg = _source(hf, "tiny-31b")
    renamed = {
        n.replace("model.language_model.", "model.", 1): t for n, t in stored_tensors(root / "sglang").items()
    }
    save_file(renamed, str(tmp_path / "model.safetensors"))
    _, failures = sglang_cpu.load_and_check(model, "conditional", full, cfg, stored_tensors(tmp_path).items())
    assert "skipped by SGLang (no weight_loader ran): model.layers.0.self_attn.q_proj.weight" in failures
    assert any(
        f.startswith("wrong values: language_model.layers.0.self_attn.qkv_proj.weight") for f in failures
    )
    assert not any(f.startswith("written twice") for f in failures)


@pytest.mark.parametrize("name", PRESETS)
def test_sglang_export_weights_and_our_reader(exported, name):
    """Weights under ``model.language_model.``, bit-equal to the source; our own reader accepts the export."""
    hf, root = exported[name]
    stored = stored_tensors(root / "sglang")
    assert all(n.startswith("model.language_model.") or n == "lm_head.weight" for n in stored)
    got, want = text_relative(stored), text_relative(stored_tensors(hf))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    src = open_hf_checkpoint(root / "sglang")
    assert src.prefix == "model.language_model."
    assert src.spec == text_spec_from_any(preset_config_dict(name))


def test_sglang_export_loads_in_hf_conditional_generation(exported):
    """transformers' ``Gemma4ForConditionalGeneration`` loads every text tensor; only the (text-only export's)
    vision tower is reported missing."""
    from transformers import Gemma4ForConditionalGeneration

    hf, root = exported["tiny-31b"]
    model, info = Gemma4ForConditionalGeneration.from_pretrained(root / "sglang", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith(("model.vision_tower.", "model.embed_vision.")) for k in info["missing_keys"]), (
        info
    )
    state = model.state_dict()
    want = text_relative(stored_tensors(hf))
    for n, t in want.items():
        assert torch.equal(state["model.language_model." + n], t), n


def test_unknown_target_is_refused(tmp_path, exported):
    _, root = exported["tiny-31b"]
    with pytest.raises(InvalidInputError, match="--for"):
        mcore_to_hf_dir(root / "mc", tmp_path / "x", target="vllm")

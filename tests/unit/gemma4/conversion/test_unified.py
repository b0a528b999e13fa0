"""The 12B's unified layout (issue 15 item 3): ``model_type gemma4_unified`` / ``gemma4_unified_text``,
``Gemma4UnifiedForConditionalGeneration``, text weights under ``model.language_model.``, a vision embedder
stored as ``model.vision_embedder.*``.

Before: the config reader refused ``gemma4_unified_text`` ("expected 'gemma4_text' or 'gemma4'"), the prefix
rule picked ``model.`` (SGLang's unified loader strips ``model.`` and drops every name that does not then
start with ``language_model.``), and the checkpoint reader refused ``model.vision_embedder.*`` as an
unexpected tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4.config import (
    HF_CONDITIONAL_GENERATION_PREFIX,
    is_conditional_generation,
    read_hf_config,
    text_spec_and_prefix,
    text_spec_from_any,
)
from gemma4.conversion.convert import roundtrip
from gemma4.conversion.hf_io import open_hf_checkpoint
from gemma4.errors import ConfigError
from harness.presets import preset_config_dict
from harness.testing.conversion import (
    megatron_state_from_hf,
    save_hf_checkpoint,
    slime_args,
    stored_tensors,
    streaming_failures,
    text_relative,
)

transformers = pytest.importorskip("transformers")
UNIFIED_ONLY_ABSENT = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block")
VISION = "model.vision_embedder.patch_dense.weight"


def _unified_text() -> dict:
    """tiny-12b as a ``gemma4_unified_text`` config: the unified class has no PLE/MoE fields."""
    text = {k: v for k, v in preset_config_dict("tiny-12b").items() if k not in UNIFIED_ONLY_ABSENT}
    return text | {"model_type": "gemma4_unified_text"}


def _unified(text: dict | None = None) -> dict:
    return {
        "model_type": "gemma4_unified",
        "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "text_config": _unified_text() if text is None else text,
    }


@pytest.fixture(scope="module")
def unified_dir(tmp_path_factory):
    """A tiny unified checkpoint: HF-saved tiny-12b text weights under ``model.language_model.``, a vision
    embedder tensor, and a ``gemma4_unified`` config.json."""
    directory = tmp_path_factory.mktemp("unified") / "hf"
    save_hf_checkpoint(directory, preset_config_dict("tiny-12b"), conditional_generation=True)
    tensors = load_file(directory / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.vision_tower.")}
    tensors[VISION] = torch.ones(4, 3)
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(_unified()))
    return directory


def test_unified_config_reads_as_the_gemma4_text_spec(tmp_path):
    """Catches: refusing gemma4_unified(_text); taking Gemma4TextConfig's defaults (PLE on) for the 12B."""
    want = text_spec_from_any(preset_config_dict("tiny-12b"))
    assert text_spec_from_any(_unified()) == want
    assert text_spec_from_any(_unified_text()) == want
    (tmp_path / "config.json").write_text(json.dumps(_unified()))
    hf = read_hf_config(tmp_path)
    assert hf.spec() == want and hf.conditional_generation and hf.prefix == HF_CONDITIONAL_GENERATION_PREFIX
    spec, prefix = text_spec_and_prefix(str(tmp_path))
    assert (spec, prefix) == (want, HF_CONDITIONAL_GENERATION_PREFIX)
    # the architecture alone (no top-level model_type) names the layout too
    assert is_conditional_generation({"architectures": ["Gemma4UnifiedForConditionalGeneration"]})


def test_unified_defaults_are_the_unified_class_defaults():
    """Catches: a unified config that leaves the window / PLE out getting Gemma4TextConfig's 512 / PLE 256."""
    text = {
        k: v for k, v in _unified_text().items() if k not in ("sliding_window", "max_position_embeddings")
    }
    spec = text_spec_from_any(_unified(text))
    assert spec.sliding_window == 1024 and spec.max_position_embeddings == 262144
    assert spec.ple_dim == 0 and not spec.enable_moe


def test_transformers_unified_objects():
    """slime's loader hands us ``AutoConfig.from_pretrained(dir)``: a ``Gemma4UnifiedConfig`` object."""
    if not hasattr(transformers, "Gemma4UnifiedConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma4UnifiedConfig")
    text = transformers.Gemma4UnifiedTextConfig(
        **{k: v for k, v in _unified_text().items() if k != "model_type"}
    )
    cfg = transformers.Gemma4UnifiedConfig(text_config=text.to_dict())
    want = text_spec_from_any(preset_config_dict("tiny-12b"))
    assert text_spec_from_any(cfg) == want and text_spec_from_any(text) == want
    assert is_conditional_generation(cfg) and not is_conditional_generation(text)
    assert text_spec_and_prefix(cfg)[1] == HF_CONDITIONAL_GENERATION_PREFIX


def test_other_model_types_still_refused():
    with pytest.raises(ConfigError, match="model_type"):
        text_spec_from_any(_unified_text() | {"model_type": "gemma3_text"})


def test_unified_checkpoint_round_trip(unified_dir):
    """Catches: the vision embedder refused as an unexpected tensor; text weights read under ``model.``."""
    src = open_hf_checkpoint(unified_dir)
    assert src.prefix == HF_CONDITIONAL_GENERATION_PREFIX
    assert src.skipped == [VISION]
    result = roundtrip(unified_dir)
    assert result["identical"], result["differences"]


def test_unified_streaming_names_are_what_sglang_unified_loads(unified_dir):
    """Weight sync for a unified ``--hf-checkpoint`` emits ``model.language_model.*`` (SGLang 0.5.23's
    ``gemma4_unified.load_weights`` strips ``model.`` and looks up ``language_model.*``); every text tensor
    exactly once and bit-equal."""
    stored = stored_tensors(unified_dir)
    hf_full = {k: v for k, v in stored.items() if k != VISION}
    assert all(k.startswith(HF_CONDITIONAL_GENERATION_PREFIX) or k == "lm_head.weight" for k in hf_full)
    model = megatron_state_from_hf(
        read_hf_config(unified_dir).hf_text_config(), text_relative(hf_full), torch.float32
    )
    assert streaming_failures(model, hf_full, slime_args(hf_checkpoint=str(unified_dir))) == []

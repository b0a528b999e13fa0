"""Issue 15 item 6: SGLang 0.5.23 starts from our HF export (``convert mcore-to-hf --for sglang``).

Before: the export is a ``gemma4_text`` config with a ``per_layer_config`` (transformers >= 5.15 schema).
SGLang flattens Gemma 4's per-layer head dims only for the multimodal model types
(``sglang/srt/utils/hf_transformers/config.py``: ``_GEMMA4_MODEL_TYPES`` lines 66-73, which lacks
``gemma4_text``; ``_apply_gemma4_attention_overrides`` lines 115-153, reading ``config.text_config``; called
at lines 311-312 of ``HfModelConfigParser.parse``), then reads ``head_dim``
(``configs/model_config.py`` line 1341, ``getattr(self.hf_text_config, "head_dim", None)``), which transformers
refuses on a heterogeneous text config with ``AmbiguousGlobalPerLayerAttributeError`` (a ``RuntimeError``,
so neither ``getattr(..., None)`` nor ``hasattr`` absorbs it). SGLang's ``Gemma4ForCausalLM``
(``models/gemma4_causal.py`` lines 1106-1107, 569-571) takes that text config as is and needs the flattened
``head_dim`` / ``swa_head_dim``. After: ``--for sglang`` writes the ``gemma4`` wrapper
(``Gemma4ForConditionalGeneration``, ``text_config``, weights under ``model.language_model.``), which the
flattening handles.

**SGLang's own config loader does not import on CPU here**: ``sglang.srt.utils.hf_transformers.config``
imports the package ``sglang.srt.utils`` -> ``srt.utils.common`` (``import orjson`` first, then the server
stack; see ``tests/unit/gemma4/slime/test_sglang_contract.py``). So the test executes SGLang's **own source**
of the flattening: the module-level definitions ``_GEMMA4_MODEL_TYPES``, ``_GEMMA4_FLATTENED_PER_LAYER_ATTRS``,
``_gemma4_attention_shapes`` and ``_apply_gemma4_attention_overrides`` are taken (by AST, unmodified) from the
installed ``sglang==0.5.23`` file and run after transformers' ``AutoConfig.from_pretrained`` (what SGLang's
``common.AutoConfig`` is without modelscope), followed by the reads ``ModelConfig`` and the model make.
Stubs: none (the extracted functions need only ``transformers`` config objects).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemma4.config import text_spec_from_any
from gemma4.conversion.convert import hf_to_mcore_dir, mcore_to_hf_dir
from gemma4.conversion.hf_io import open_hf_checkpoint
from gemma4.errors import InvalidInputError
from harness.presets import preset_config_dict
from harness.testing.conversion import save_hf_checkpoint, stored_tensors, text_relative

transformers = pytest.importorskip("transformers")
SGLANG_VERSION = "0.5.23"
FLATTENING = (
    "_GEMMA4_MODEL_TYPES",
    "_GEMMA4_FLATTENED_PER_LAYER_ATTRS",
    "_gemma4_attention_shapes",
    "_apply_gemma4_attention_overrides",
)


def _sglang_config_source() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution, version

    try:
        got = version("sglang")
    except PackageNotFoundError:
        pytest.skip(
            f"sglang=={SGLANG_VERSION} is not installed (pip install --no-deps sglang=={SGLANG_VERSION})"
        )
    assert got == SGLANG_VERSION, (
        f"pinned to sglang {SGLANG_VERSION} (line numbers in the docstring), got {got}"
    )
    path = Path(distribution("sglang").locate_file("sglang/srt/utils/hf_transformers/config.py"))
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def sglang_flattening() -> dict:
    """SGLang 0.5.23's Gemma 4 flattening, executed from its installed source (see the module docstring)."""
    path = _sglang_config_source()
    tree = ast.parse(path.read_text(), str(path))
    nodes = []
    for node in tree.body:
        names = (
            [node.name]
            if isinstance(node, ast.FunctionDef)
            else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        )
        if any(n in FLATTENING for n in names):
            nodes.append(node)
    assert sorted(n.name if isinstance(n, ast.FunctionDef) else n.targets[0].id for n in nodes) == sorted(
        FLATTENING
    ), "SGLang's flattening moved"
    ns: dict = {}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102
    return ns


def sglang_load(directory: Path, ns: dict):
    """What SGLang 0.5.23 does with ``directory`` up to building the model: ``AutoConfig.from_pretrained``
    (``HfModelConfigParser.parse``), the Gemma 4 flattening when ``model_type`` is in its list (311-312),
    ``get_hf_text_config`` (the ``text_config`` of the wrapper), then ``ModelConfig``'s head-dim reads
    (model_config.py 1341-1365) and the per-layer head dim the model picks (gemma4_causal.py 569-571).
    Returns ``(architecture, [head_dim per layer], [kv heads per layer])``."""
    config = transformers.AutoConfig.from_pretrained(directory)
    if config.model_type in ns["_GEMMA4_MODEL_TYPES"]:
        ns["_apply_gemma4_attention_overrides"](config)
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None)  # ModelConfig: raises on an unflattened per-layer config
    assert head_dim is not None
    swa = getattr(text, "swa_head_dim", None) or head_dim
    swa_kv = getattr(text, "swa_num_key_value_heads", text.num_key_value_heads)
    full = [t == "full_attention" for t in text.layer_types]
    dims = [head_dim if f else swa for f in full]
    kv = [text.num_key_value_heads if f else swa_kv for f in full]
    return config.architectures[0], dims, kv


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny-31b (sliding head dim 16, full 32; K=V full layers) and tiny-26b-a4b: HF -> Megatron, and both
    exports."""
    out = {}
    for name in ("tiny-31b", "tiny-26b-a4b"):
        root = tmp_path_factory.mktemp(name)
        hf = save_hf_checkpoint(root / "hf", preset_config_dict(name), torch.float32)
        hf_to_mcore_dir(hf, root / "mc")
        mcore_to_hf_dir(root / "mc", root / "plain")
        mcore_to_hf_dir(root / "mc", root / "sglang", target="sglang")
        out[name] = (hf, root)
    return out


def _want(name: str):
    spec = text_spec_from_any(preset_config_dict(name))
    types = preset_config_dict(name)["layer_types"]
    return [spec.head_dim_of(t) for t in types], [spec.kv_heads_of(t) for t in types]


def test_plain_export_does_not_start_sglang(exported, sglang_flattening):
    """Before (and still the default ``--for hf``): SGLang's config path fails on the ``gemma4_text`` export."""
    _, root = exported["tiny-31b"]
    assert json.loads((root / "plain" / "config.json").read_text())["model_type"] == "gemma4_text"
    with pytest.raises(RuntimeError, match="head_dim"):
        sglang_load(root / "plain", sglang_flattening)


@pytest.mark.parametrize("name", ["tiny-31b", "tiny-26b-a4b"])
def test_sglang_export_flattens_to_the_models_head_dims(exported, sglang_flattening, name):
    _, root = exported[name]
    arch, dims, kv = sglang_load(root / "sglang", sglang_flattening)
    assert arch == "Gemma4ForConditionalGeneration"
    want_dims, want_kv = _want(name)
    assert len(set(want_dims)) == 2  # full layers' head dim differs from sliding ones'
    assert dims == want_dims
    assert kv == want_kv


@pytest.mark.parametrize("name", ["tiny-31b", "tiny-26b-a4b"])
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
    assert load_file(next((root / "sglang").glob("*.safetensors"))) is not None


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

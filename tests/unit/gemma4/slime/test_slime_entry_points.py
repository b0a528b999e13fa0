"""The slime entry points: signatures, and that each produces exactly what our own code produces."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from gemma4.config import text_spec_from_any
from gemma4.conversion.mapping import hf_to_mcore, load_mcore_state_dict
from gemma4.errors import InvalidInputError
from gemma4.model.build import build_gemma4_model
from gemma4.model.spec import get_gemma4_decoder_block_spec
from gemma4.model.transformer_config import make_transformer_config
from gemma4.slime import model_provider as provider_module
from gemma4.slime.args import PROVIDER_PATH
from gemma4.slime.spec import apply_gemma4_config, build_block_spec, get_gemma4_spec, swap_linears
from harness.presets import PRESETS, preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict
from harness.testing.slime import flags_for_spec, parse_megatron_flags, transformer_config_from_args


def _args_config(cfg: dict, dtype=torch.float32, **overrides):
    from gemma4.runtime import init_single_process

    init_single_process()
    spec = text_spec_from_any(cfg)
    args = parse_megatron_flags(flags_for_spec(spec), gemma4_text_spec=spec, **overrides)
    return spec, args, transformer_config_from_args(args, params_dtype=dtype)


def describe(node):
    """A comparable description of a spec tree (partials by function and keywords)."""
    if isinstance(node, functools.partial):
        return ("partial", node.func, tuple(sorted(node.keywords.items())))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return (
            type(node).__name__,
            tuple((f.name, describe(getattr(node, f.name))) for f in dataclasses.fields(node)),
        )
    if isinstance(node, dict):
        return tuple(sorted((k, describe(v)) for k, v in node.items()))
    if isinstance(node, (list, tuple)):
        return tuple(describe(x) for x in node)
    return node


def test_signatures_are_slimes():
    """slime calls these by keyword/position exactly like this."""
    from gemma4.slime.loader import gemma4_hf_tensor
    from gemma4.slime.loss_mask import make_loss_mask_generator
    from gemma4.slime.weight_sync import convert_gemma4_to_hf, convert_to_hf

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(get_gemma4_spec) == [
        ("args", inspect._empty),
        ("config", inspect._empty),
        ("vp_stage", None),
    ]
    assert params(provider_module.model_provider) == [
        ("pre_process", True),
        ("post_process", True),
        ("vp_stage", None),
    ]
    assert [n for n, _ in params(convert_gemma4_to_hf)] == ["args", "name", "param"]
    assert [n for n, _ in params(gemma4_hf_tensor)] == ["name", "reader", "config"]
    assert [n for n, _ in params(convert_to_hf)][:5] == [
        "args",
        "model_name",
        "name",
        "param",
        "quantization_config",
    ]
    assert [n for n, _ in params(make_loss_mask_generator)][:2] == ["tokenizer", "tokenizer_type"]


def test_importing_the_plugin_imports_no_slime_sglang_ray_or_megatron_training():
    code = (
        "import sys, gemma4.slime, gemma4.slime.spec, gemma4.slime.model_provider, gemma4.slime.weight_sync, "
        "gemma4.slime.loader, gemma4.slime.loss_mask, gemma4.slime.hooks, gemma4.slime.hooks as h\n"
        "h.install()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('slime', 'sglang', 'ray') or m.startswith('megatron.training')]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b", "tiny-e2b"])
def test_spec_is_our_decoder_block_spec(preset):
    """Catches: a spec hook that drifts from gemma4.model.spec (another attention, norm or MoE layer)."""
    spec, args, config = _args_config(preset_config_dict(preset))
    got = get_gemma4_spec(args, config, None)
    want = get_gemma4_decoder_block_spec(make_transformer_config(spec, torch.float32))
    assert describe(got) == describe(want)


def test_spec_sets_gemma4_math_on_megatrons_config():
    spec, args, config = _args_config(preset_config_dict("tiny-26b-a4b"))
    assert config.activation_func is F.gelu  # Megatron's default (erf GELU)
    config.bias_activation_fusion = config.apply_rope_fusion = True  # Megatron-LM turns these on by default
    build_block_spec(args, config)
    ours = make_transformer_config(spec, torch.float32)
    for name in ("activation_func", "gated_linear_unit", "softmax_scale", "bias_activation_fusion",
                 "apply_rope_fusion", "moe_router_pre_softmax", "moe_grouped_gemm", "moe_router_load_balancing_type"):  # fmt: skip
        assert getattr(config, name) == getattr(ours, name), name
    assert config.gemma4 is spec and config.hetereogenous_dist_checkpoint
    assert config.gemma4_attention_backend == "auto"


@pytest.mark.parametrize(
    ("field", "value", "needs"),
    [
        ("activation_func", F.silu, "gelu_tanh"),
        ("gated_linear_unit", False, None),
        ("moe_grouped_gemm", True, "False"),
    ],
)
def test_user_choices_that_contradict_gemma4_are_refused(field, value, needs):
    spec, args, config = _args_config(preset_config_dict("tiny-26b-a4b"))
    if needs is None:  # a default Megatron value is replaced, not refused
        setattr(config, field, value)
        apply_gemma4_config(config, spec)
        assert getattr(config, field) is True
        return
    setattr(config, field, value)
    with pytest.raises(InvalidInputError, match=f"config.{field}.*{needs}"):
        apply_gemma4_config(config, spec)


def test_spec_alone_is_refused_without_our_model_provider():
    """A plain GPTModel with our layers would miss the embedding scale, the dual RoPE and the softcap."""
    _, args, config = _args_config(preset_config_dict("tiny-31b"), custom_model_provider_path=None)
    with pytest.raises(InvalidInputError, match="--custom-model-provider-path"):
        get_gemma4_spec(args, config)
    args.custom_model_provider_path, args.spec = PROVIDER_PATH, ["other.module", "fn"]
    with pytest.raises(InvalidInputError, match="conflicts"):
        provider_module.build_model(args, config)


def test_unknown_backend_and_missing_transformer_engine_are_named():
    _, args, config = _args_config(preset_config_dict("tiny-31b"), gemma4_attention_backend="cudnn")
    with pytest.raises(InvalidInputError, match="attention backend 'cudnn'"):
        build_block_spec(args, config)
    _, args, config = _args_config(preset_config_dict("tiny-31b"), transformer_impl="transformer_engine")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:  # here (no TE): a clear error, not Megatron's stand-in classes
        with pytest.raises(InvalidInputError, match="--transformer-impl local"):
            build_block_spec(args, config)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_model_provider_builds_our_model(preset, monkeypatch):
    """model_provider() (Megatron-LM's args and config injected) == build_gemma4_model: same tensors, and the
    same logits bit for bit once loaded with the same weights. Catches a provider that forgets the
    embedding scale, the softcap, the RoPE or a layer_scalar, ties differently or pads the vocabulary."""
    cfg = preset_config_dict(preset)
    spec, args, config = _args_config(cfg)
    monkeypatch.setattr(provider_module, "megatron_args_and_config", lambda: (args, config))
    monkeypatch.setenv("GEMMA4_SLIME_HOOKS", "0")
    ours = provider_module.model_provider(pre_process=True, post_process=True, vp_stage=None)
    want = build_gemma4_model(spec, torch.float32)

    def shapes(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    assert shapes(ours) == shapes(want)
    weights = hf_to_mcore(hf_text_state_dict(build_reference_model(text_spec_hf(cfg), torch.float32)), spec)
    load_mcore_state_dict(ours, weights)
    load_mcore_state_dict(want, weights)
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(ids), want.eval()(ids))


def text_spec_hf(cfg):
    from gemma4.config import hf_text_config_from_any

    return hf_text_config_from_any(cfg)


def test_model_provider_outside_slime_says_so():
    with pytest.raises(InvalidInputError, match="megatron.training"):
        provider_module.model_provider()


class _Column:  # stand-ins for Transformer Engine's linears (TE itself needs CUDA)
    pass


def test_transformer_engine_variant_swaps_only_the_plain_linears():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from gemma4.model.attention import KEqVColumnParallelLinear

    spec = text_spec_from_any(preset_config_dict("tiny-26b-a4b"))
    block = get_gemma4_decoder_block_spec(make_transformer_config(spec, torch.float32))
    te_col = type("TEColumnParallelLinear", (ColumnParallelLinear,), {})
    te_row = type("TERowParallelLinear", (RowParallelLinear,), {})
    swapped = swap_linears(block, te_col, te_row)
    found = []

    def walk(node):
        if isinstance(node, type):
            found.append(node)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(swapped)
    assert ColumnParallelLinear not in found and RowParallelLinear not in found
    assert te_col in found and te_row in found and KEqVColumnParallelLinear in found
    assert describe(block) != describe(swapped)
    walk(block)  # the original is untouched
    assert ColumnParallelLinear in found


# ---- weight sync ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b"])
def test_weight_sync_is_the_streaming_converter(preset):
    """slime's dispatcher shape gives, for every parameter, exactly what the conversion package gives."""
    from gemma4.conversion import streaming
    from gemma4.slime import weight_sync

    cfg = preset_config_dict(preset)
    spec, args, config = _args_config(cfg)
    model = provider_module.build_model(args, config)
    for name, param in model.state_dict().items():
        name = "module.module." + name
        got = weight_sync.convert_to_hf(args, "gemma4config", name, param)
        want = streaming.param_to_hf(name, param, *weight_sync.resolve_target(args))
        assert [n for n, _ in got] == [n for n, _ in want]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    with pytest.raises(InvalidInputError, match="quantized"):
        weight_sync.convert_to_hf(args, "gemma4config", name, param, quantization_config=object())
    with pytest.raises(InvalidInputError, match="qwen3config"):
        weight_sync.convert_to_hf(args, "qwen3config", name, param)


def test_dispatcher_wrapper_routes_by_model_name():
    from gemma4.slime.weight_sync import dispatcher_with_gemma4, is_gemma4_model_name

    assert all(map(is_gemma4_model_name, ["gemma4config", "Gemma4TextConfig", "gemma-4", "gemma4_unified"]))
    assert not any(map(is_gemma4_model_name, ["gemma3config", "qwen3moeconfig", None]))
    calls = []

    def original(args, model_name, name, param, quantization_config=None):
        calls.append(model_name)
        return [("orig", param)]

    wrapped = dispatcher_with_gemma4(original)
    p = torch.ones(1)
    assert wrapped(None, "qwen3config", "x", p) == [("orig", p)] and calls == ["qwen3config"]
    spec = text_spec_from_any(preset_config_dict("tiny-12b"))
    norm = torch.ones(spec.hidden_size)
    out = wrapped(
        types.SimpleNamespace(gemma4_text_spec=spec), "gemma4config", "decoder.final_layernorm.weight", norm
    )
    assert out == [("model.norm.weight", norm)] and calls == ["qwen3config"]


def test_what_our_model_refuses_is_refused_through_slime_too():
    """The provider validates through make_transformer_config: pipeline parallelism with PLE/KV sharing."""
    spec, args, _ = _args_config(preset_config_dict("tiny-e2b"))
    config = transformer_config_from_args(args, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    with pytest.raises(InvalidInputError, match="pipeline parallelism"):
        build_block_spec(args, config)

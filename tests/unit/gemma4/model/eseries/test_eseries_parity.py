"""E2B/E4B: per-layer embeddings, KV sharing and the double-wide MLP equal HF (fp64 exact, gradients),
packed, under CP/TP and with activation recompute; planted E-series bugs turn parity red."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gemma4.model.attention as attention
import gemma4.model.gpt_model as gpt_model
import gemma4.model.layer as layer_mod
import gemma4.model.transformer_config as transformer_config
from gemma4.config import hf_text_config_from_any, text_spec_from_hf
from harness.parity import ParitySource, RunLayout, resolve_source, run_parity
from harness.strategies import e_series_configs


def _source(config: dict) -> ParitySource:
    cfg = hf_text_config_from_any(config)
    return ParitySource("hypothesis-e", cfg, text_spec_from_hf(cfg))


def _explain(r):
    return f"{r['layout']['name']}: first divergence {r['first_divergence']}; {r['failures']}; {r['config']}"


def test_preset_structure():
    e2b = resolve_source(preset="tiny-e2b").spec
    assert e2b.kv_sharing[6:] == ("reuse",) * 4 and e2b.stores_kv(5) and e2b.stores_kv(4)
    assert e2b.intermediate_sizes == (48,) * 6 + (96,) * 4  # double-wide only on reuse layers
    e4b = resolve_source(preset="tiny-e4b").spec
    assert set(e4b.intermediate_sizes) == {80} and e4b.stores_kv(7) and e4b.stores_kv(5)


@given(
    config=e_series_configs(), batch=st.integers(1, 2), seq_len=st.integers(2, 12), seed=st.integers(0, 2**16)
)
def test_fp64_forward_and_gradients(config, batch, seq_len, seed):
    result = run_parity(_source(config), torch.float64, batch=batch, seq_len=seq_len, seed=seed, grads=True)
    assert result["pass"], _explain(result)
    assert result["metrics"]["grads_max_scaled"] <= 1e-9


@settings(max_examples=6)
@given(config=e_series_configs(), seq_len=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_fp32(config, seq_len, seed):
    result = run_parity(_source(config), torch.float32, batch=2, seq_len=seq_len, seed=seed)
    assert result["pass"], _explain(result)


LAYOUTS = [
    RunLayout(packed=(8, 12, 4)),
    RunLayout(recompute=True),
    RunLayout(cp=2),
    RunLayout(cp=2, packed=(8, 12, 4), recompute=True),
    RunLayout(tp=2, sequence_parallel=True),
]


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-e4b"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_layouts(preset, layout):
    result = run_parity(resolve_source(preset=preset), torch.float64, grads=True, layout=layout)
    assert result["pass"], _explain(result)


def test_recompute_really_recomputes(monkeypatch):
    """The recompute layout goes through Megatron's checkpoint (so the carry crosses it as ``context``)."""
    from megatron.core import tensor_parallel

    calls = []
    orig = tensor_parallel.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(tensor_parallel, "checkpoint", spy)
    result = run_parity(
        resolve_source(preset="tiny-e2b"), torch.float64, grads=True, layout=RunLayout(recompute=True)
    )
    assert result["pass"], _explain(result)
    assert len(calls) == 10  # one checkpoint per layer


def test_carry_reaches_the_block_as_an_argument_not_instance_state():
    """The carry is built in ``forward`` and handed to ``TransformerBlock.forward`` as ``context`` (a public
    argument): no attribute of the model changes during the call (an instance side channel would), and
    the first layer gets it with the layout's size. Megatron's combined-1F1B schedule plan, which would
    bypass both our forward and our layer forward, is refused."""
    from gemma4.model.build import build_gemma4_model
    from gemma4.model.carry import carry_layout

    spec = resolve_source(preset="tiny-e2b").spec
    model = build_gemma4_model(spec, torch.float64)
    before = {k: id(v) for k, v in vars(model).items()}
    seen = {}

    def block_hook(module, args, kwargs):
        seen["during"] = {k: id(v) for k, v in vars(model).items()}
        seen["block_context"] = kwargs.get("context")

    def layer_hook(module, args, kwargs):
        seen["layer_context"] = kwargs.get("context")

    model.decoder.register_forward_pre_hook(block_hook, with_kwargs=True)
    model.decoder.layers[0].register_forward_pre_hook(layer_hook, with_kwargs=True)
    ids = torch.randint(0, spec.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert logits.shape == (2, 5, spec.vocab_size)
    assert seen["during"] == before == {k: id(v) for k, v in vars(model).items()}
    assert seen["layer_context"] is seen["block_context"]
    assert seen["block_context"].shape == (carry_layout(spec, 5, 5, 2, 1).numel,)
    # the refusal names the plan and the Megatron flag that asks for it, and says why
    with pytest.raises(NotImplementedError) as refused:
        model.build_schedule_plan(ids, None, None)
    message = str(refused.value)
    for needle in (
        "combined 1F1B schedule plan",
        "overlap_moe_expert_parallel_comm",
        "bypasses Gemma 4's forward",
    ):
        assert needle in message, message


# ---- planted bugs ----------------------------------------------------------------------------------------


def ple_scale_wrong(mp):
    """PLE token table scaled by sqrt(H) instead of sqrt(P)."""
    orig = gpt_model.embedding_scale
    mp.setattr(gpt_model, "embedding_scale", lambda size, dtype: orig(64 if size == 8 else size, dtype))


def ple_combination_scale_dropped(mp):
    orig = gpt_model.Gemma4Model._per_layer_inputs
    mp.setattr(gpt_model.Gemma4Model, "_per_layer_inputs", lambda self, e, i: orig(self, e, i) * 2.0**0.5)


def shared_layer_reads_wrong_producer(mp):
    """Reuse layers read the *first* layer of their type instead of the last one before the shared block."""
    orig = layer_mod.Gemma4TransformerLayer.__init__

    def init(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        spec = self.gemma4
        first_of_type = spec.layer_types.index(self.layer_type)
        self.stores_kv = self.layer_index == first_of_type

    mp.setattr(layer_mod.Gemma4TransformerLayer, "__init__", init)


def shared_k_before_rope(mp):
    orig = attention.Gemma4SelfAttention.forward

    def forward(self, hidden_states, *args, return_kv=False, **kwargs):
        out = orig(self, hidden_states, *args, return_kv=return_kv, **kwargs)
        if return_kv:
            q, k, v = self.get_query_key_value_tensors(self.last_input)
            return out[0], out[1], (k, v)
        return out

    def pre_hook(module, args, kwargs):
        module.last_input = args[0] if args else kwargs["hidden_states"]

    mp.setattr(attention.Gemma4SelfAttention, "forward", forward)
    orig_init = attention.Gemma4SelfAttention.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.register_forward_pre_hook(pre_hook, with_kwargs=True)

    mp.setattr(attention.Gemma4SelfAttention, "__init__", init)


def double_wide_on_wrong_layers(mp):
    """Double width on the store layers instead of the reuse layers (weights keep HF's widths)."""
    orig = transformer_config.config_for_layer

    def config_for_layer(config, index):
        cfg = orig(config, index)
        spec = config.gemma4
        if spec.intermediate_sizes and spec.stores_kv(index):
            cfg.ffn_hidden_size = 2 * spec.intermediate_size
        return cfg

    mp.setattr(layer_mod, "config_for_layer", config_for_layer)


MUTANTS = [
    (ple_scale_wrong, "tiny-e2b", "layer 0 (sliding_attention) output"),
    (ple_combination_scale_dropped, "tiny-e4b", "layer 0 (sliding_attention) output"),
    (shared_layer_reads_wrong_producer, "tiny-e2b", "layer 6 (sliding_attention) attention"),
    (shared_k_before_rope, "tiny-e4b", "layer 8 (sliding_attention) attention"),
]


@pytest.mark.parametrize("case", MUTANTS, ids=[m.__name__ for m, *_ in MUTANTS])
def test_planted_e_series_bug_turns_parity_red(monkeypatch, case):
    mutant, preset, where = case
    mutant(monkeypatch)
    result = run_parity(resolve_source(preset=preset), torch.float64)
    assert not result["pass"], f"{mutant.__name__} was not detected: {result['metrics']}"
    assert result["first_divergence"] == where, result["failures"]


def test_planted_double_wide_on_wrong_layers_is_refused(monkeypatch):
    """Wrong widths cannot load HF's weights: the loader names the first mismatching tensor."""
    from gemma4.errors import InvalidInputError

    double_wide_on_wrong_layers(monkeypatch)
    with pytest.raises(InvalidInputError, match="linear_fc1"):
        run_parity(resolve_source(preset="tiny-e2b"), torch.float64)

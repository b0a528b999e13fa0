"""Whole-model MoE parity with HF (fp64 exact: logits, activations incl. the routed branch, every gradient),
expert parallelism on forked gloo ranks, and the planted MoE bugs that must turn it red."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gemma4.conversion.mapping as mapping
import gemma4.model.moe as moe
import gemma4.model.transformer_config as transformer_config
from gemma4.config import hf_text_config_from_any, text_spec_from_hf
from gemma4.model.norms import rms_norm
from harness.parity import ParitySource, RunLayout, resolve_source, run_parity
from harness.presets import preset_config_dict
from harness.strategies import moe_configs


def _source(config: dict) -> ParitySource:
    cfg = hf_text_config_from_any(config)
    return ParitySource("hypothesis-moe", cfg, text_spec_from_hf(cfg))


def _explain(r):
    return f"{r['layout']['name']}: first divergence {r['first_divergence']}; {r['failures']}; {r['config']}"


@given(config=moe_configs(), batch=st.integers(1, 2), seq_len=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_fp64_forward_and_gradients(config, batch, seq_len, seed):
    """Router, experts and dense branch: every activation and every gradient equal HF's (fp64)."""
    result = run_parity(_source(config), torch.float64, batch=batch, seq_len=seq_len, seed=seed, grads=True)
    assert result["pass"], _explain(result)
    assert result["metrics"]["grads_max_scaled"] <= 1e-9


def test_experts_without_tokens():
    """16 experts, top-1, three tokens: at least 13 experts get nothing; their gradients are zero on both
    sides (a dispatcher that drops them, or gives them stale grads, fails)."""
    config = preset_config_dict("tiny-26b-a4b") | {"num_experts": 16, "top_k_experts": 1}
    result = run_parity(_source(config), torch.float64, batch=1, seq_len=3, grads=True)
    assert result["pass"], _explain(result)
    idle = [
        n
        for n, d in result["grads"]["per_parameter"].items()
        if "local_experts" in n and d["ref_max_abs"] == 0
    ]
    assert len(idle) >= 2 * 13 * 6  # fc1 and fc2 of >= 13 idle experts in each of 6 layers


@settings(max_examples=6)
@given(config=moe_configs(), seq_len=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_fp32(config, seq_len, seed):
    result = run_parity(_source(config), torch.float32, batch=2, seq_len=seq_len, seed=seed)
    assert result["pass"], _explain(result)


MP_LAYOUTS = [
    RunLayout(ep=2),
    RunLayout(ep=4),
    RunLayout(cp=2, ep=2),
    RunLayout(tp=2, sequence_parallel=True),
    RunLayout(tp=2, sequence_parallel=True, ep=2),
]


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("layout", MP_LAYOUTS, ids=[lay.name for lay in MP_LAYOUTS])
def test_expert_and_tensor_parallel(layout):
    """EP ranks are data-parallel replicas holding E/ep experts each; forward and gradients (router under
    SP included) must equal HF and the single-process run."""
    src = resolve_source(preset="tiny-26b-a4b")
    result = run_parity(src, torch.float64, batch=4, grads=True, layout=layout)
    assert result["pass"], _explain(result)
    single = run_parity(src, torch.float64, batch=4, layout=RunLayout())
    diff = (result.tensors.megatron_logits - single.tensors.megatron_logits).abs().max()
    assert float(diff) <= 1e-9


# ---- planted bugs ----------------------------------------------------------------------------------------


def _route_mutant(mp, body):
    mp.setattr(moe.Gemma4Router, "route", body)


def renormalisation_dropped(mp):
    def route(self, hidden):
        z = rms_norm(hidden, None, self.eps) * self.scale * hidden.shape[-1] ** -0.5
        probs = torch.softmax(torch.nn.functional.linear(z, self.weight), dim=-1, dtype=hidden.dtype)
        w, i = torch.topk(probs, k=self.topk, dim=-1)
        return probs, w * self.per_expert_scale[i], i

    _route_mutant(mp, route)


def per_expert_scale_dropped(mp):
    def route(self, hidden):
        z = rms_norm(hidden, None, self.eps) * self.scale * hidden.shape[-1] ** -0.5
        probs = torch.softmax(torch.nn.functional.linear(z, self.weight), dim=-1, dtype=hidden.dtype)
        w, i = torch.topk(probs, k=self.topk, dim=-1)
        return probs, w / w.sum(-1, keepdim=True), i

    _route_mutant(mp, route)


def softmax_in_bf16(mp):
    orig = moe.Gemma4Router.route

    def route(self, hidden):
        probs, w, i = orig(self, hidden)
        z = rms_norm(hidden, None, self.eps) * self.scale * hidden.shape[-1] ** -0.5
        logits = torch.nn.functional.linear(z, self.weight).to(torch.bfloat16)
        probs = torch.softmax(logits, dim=-1).to(hidden.dtype)
        w, i = torch.topk(probs, k=self.topk, dim=-1)
        return probs, w / w.sum(-1, keepdim=True) * self.per_expert_scale[i], i

    _route_mutant(mp, route)


def router_fed_normed_residual(mp):
    orig = moe.Gemma4MoELayer.forward

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        # route on pre_feedforward_layernorm_2(r) instead of r: swap what the router sees
        routed_in = self.pre_experts_layernorm(hidden_states)
        mp_orig_route = self.router.forward
        self.router.forward = lambda h, pm=None: mp_orig_route(routed_in, pm)
        try:
            return orig(self, hidden_states, intermediate_tensors, padding_mask)
        finally:
            del self.router.forward

    mp.setattr(moe.Gemma4MoELayer, "forward", forward)


def expert_gate_up_swapped(mp):
    orig = mapping.hf_to_mcore

    def hf_to_mcore(hf, spec, *args, **kwargs):
        hf = dict(hf)
        for k, v in list(hf.items()):
            if k.endswith("experts.gate_up_proj"):
                gate, up = v.chunk(2, dim=1)
                hf[k] = torch.cat([up, gate], dim=1)
        return orig(hf, spec, *args, **kwargs)

    mp.setattr(mapping, "hf_to_mcore", hf_to_mcore)


def experts_norm_swapped_with_dense(mp):
    orig = mapping.hf_to_mcore

    def hf_to_mcore(hf, spec, *args, **kwargs):
        hf = dict(hf)
        for layer in range(spec.num_layers):
            a, b = (
                f"layers.{layer}.pre_feedforward_layernorm.weight",
                f"layers.{layer}.pre_feedforward_layernorm_2.weight",
            )
            hf[a], hf[b] = hf[b], hf[a]
        return orig(hf, spec, *args, **kwargs)

    mp.setattr(mapping, "hf_to_mcore", hf_to_mcore)


def aux_loss_silently_on(mp):
    orig = transformer_config.make_transformer_config

    def make(spec, dtype=torch.float32, **kw):
        cfg = orig(spec, dtype, **kw)
        if spec.enable_moe:
            object.__setattr__(cfg, "moe_aux_loss_coeff", 1e-2)
        return cfg

    mp.setattr(transformer_config, "make_transformer_config", make)
    import gemma4.model.build as build

    mp.setattr(build, "make_transformer_config", make)


def router_grads_not_reduced_under_sp(mp):
    orig = moe.Gemma4Router.__init__

    def init(self, config, pg_collection=None):
        orig(self, config, pg_collection)
        for p in self.parameters():
            p.sequence_parallel = False

    mp.setattr(moe.Gemma4Router, "__init__", init)


MUTANTS = [
    (renormalisation_dropped, RunLayout(), False, "layer 0 (sliding_attention) experts"),
    (per_expert_scale_dropped, RunLayout(), False, "layer 0 (sliding_attention) experts"),
    (softmax_in_bf16, RunLayout(), False, "layer 0 (sliding_attention) experts"),
    (router_fed_normed_residual, RunLayout(), False, "layer 0 (sliding_attention) experts"),
    (expert_gate_up_swapped, RunLayout(), False, "layer 0 (sliding_attention) experts"),
    (experts_norm_swapped_with_dense, RunLayout(), False, "layer 0 (sliding_attention) mlp"),
    (aux_loss_silently_on, RunLayout(), True, "gradient of"),
    (router_grads_not_reduced_under_sp, RunLayout(tp=2, sequence_parallel=True), True, "gradient of"),
]


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("case", MUTANTS, ids=[m.__name__ for m, *_ in MUTANTS])
def test_planted_moe_bug_turns_parity_red(monkeypatch, case):
    mutant, layout, grads, where = case
    mutant(monkeypatch)
    result = run_parity(resolve_source(preset="tiny-26b-a4b"), torch.float64, grads=grads, layout=layout)
    assert not result["pass"], f"{mutant.__name__} was not detected: {result['metrics']}"
    assert result["first_divergence"].startswith(where), result["failures"]

"""Our router against HF's ``Gemma4TextRouter``: probabilities, selected experts and weights.

fp64 with the exact reference (softmax cast removed): indices must agree exactly, weights to 1e-12.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

from gemma4.config import text_spec_from_any
from gemma4.model.moe import Gemma4Router
from gemma4.model.transformer_config import make_transformer_config
from gemma4.runtime import init_single_process
from harness.presets import preset_config_dict
from harness.reference import _exact_router_forward


def _pair(hidden: int, experts: int, top_k: int, seed: int, dtype=torch.float64):
    init_single_process()
    cfg = preset_config_dict("tiny-26b-a4b") | {
        "hidden_size": hidden,
        "num_experts": experts,
        "top_k_experts": top_k,
    }
    spec = text_spec_from_any(cfg)
    hf_cfg = Gemma4TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    ref = Gemma4TextRouter(hf_cfg).to(dtype)
    if dtype == torch.float64:
        ref.forward = types.MethodType(_exact_router_forward, ref)
        ref.norm.forward = types.MethodType(
            lambda self, x: self._norm(x).type_as(x), ref.norm
        )  # exact fp64 scaleless norm, as the exact reference does
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref.proj.weight.copy_(torch.randn(experts, hidden, generator=gen) * 2.0)
        ref.scale.copy_(torch.rand(hidden, generator=gen) * 1.2 + 0.4)
        ref.per_expert_scale.copy_(torch.rand(experts, generator=gen) * 1.2 + 0.4)
    ours = Gemma4Router(make_transformer_config(spec, dtype))
    with torch.no_grad():
        ours.weight.copy_(ref.proj.weight)
        ours.scale.copy_(ref.scale)
        ours.per_expert_scale.copy_(ref.per_expert_scale)
    return ref, ours, gen


def _compare(ref, ours, x):
    p_ref, w_ref, i_ref = ref(x)
    p, w, i = ours.route(x)
    assert torch.equal(i, i_ref), "selected experts differ"
    assert (p - p_ref).abs().max() <= 1e-12
    assert (w - w_ref).abs().max() <= 1e-12
    probs, routing_map = ours(x)
    assert torch.equal(routing_map.sum(-1), torch.full((x.shape[0],), i.shape[1]))
    assert torch.equal(probs.gather(1, i), w)  # Megatron's dense probs carry exactly HF's weights


@given(
    hidden=st.sampled_from([16, 32, 64]),
    experts=st.sampled_from([2, 4, 8, 16]),
    data=st.data(),
    tokens=st.integers(1, 40),
    seed=st.integers(0, 10_000),
)
def test_router_matches_hf(hidden, experts, data, tokens, seed):
    """Catches: renormalisation dropped, per_expert_scale dropped or indexed wrong, H^-0.5 missing, router
    norm with a weight, softmax over the top-k logits only with different ties."""
    top_k = data.draw(st.integers(1, experts))
    ref, ours, gen = _pair(hidden, experts, top_k, seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64) * 3
    _compare(ref, ours, x)


@pytest.mark.parametrize("top_k", [1, 8])
def test_edge_top_k_one_and_all(top_k):
    ref, ours, gen = _pair(32, 8, top_k, 1)
    x = torch.randn(20, 32, generator=gen, dtype=torch.float64)
    _compare(ref, ours, x)
    if top_k == 8:  # all experts: weights are the per-expert scales of a renormalised full softmax
        _, w, i = ours.route(x)
        assert torch.equal(i.sort(-1).values, torch.arange(8).expand(20, -1))


def test_exact_and_near_ties_break_like_hf():
    """Duplicate router rows give bit-identical scores; rows 1e-13 apart give near ties. torch.topk on the
    same probability tensor decides both ways, so the selection must equal HF's exactly."""
    ref, ours, gen = _pair(32, 8, 3, 2)
    with torch.no_grad():
        ref.proj.weight[5].copy_(ref.proj.weight[2])
        ref.proj.weight[6].copy_(ref.proj.weight[3] + 1e-13)
        ours.weight.copy_(ref.proj.weight)
    x = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    _compare(ref, ours, x)
    probs, _, i = ours.route(x)
    assert torch.equal(probs[:, 2], probs[:, 5])  # exact ties on every token
    broken_at_boundary = (i == 2).any(-1) ^ (i == 5).any(-1)
    assert bool(broken_at_boundary.any()), "no token had the tie at the top-k boundary"


def test_router_params_are_marked_for_sequence_parallel_grad_reduction():
    """Megatron's finalize_model_grads all-reduces params marked ``sequence_parallel`` over TP; the
    multi-process TP2+SP parity test (tests/unit/gemma4/model/moe/test_moe_parity.py) checks the resulting gradients."""
    init_single_process()
    spec = text_spec_from_any(preset_config_dict("tiny-26b-a4b"))
    cfg = make_transformer_config(spec, torch.float32)
    object.__setattr__(cfg, "sequence_parallel", True)  # as under TP > 1 with SP; this process has TP 1
    router = Gemma4Router(cfg)
    assert all(getattr(p, "sequence_parallel", False) for p in router.parameters())

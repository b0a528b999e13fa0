"""The mapping table against both oracles: HF's state dict (names, shapes) and Megatron's modules (names,
TP partition dims, what each TP rank's parallel layer holds), plus the MoE/expert transforms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

from gemma4.config import Gemma4TextSpec, hf_text_config_from_any, text_spec_from_any
from gemma4.conversion import mapping, sharding
from gemma4.conversion.hf_io import drop_dead_kv_shared_weights
from gemma4.conversion.mcore_io import gather_rule, plan, split_rule
from gemma4.errors import InvalidInputError
from gemma4.model.build import build_gemma4_model
from harness.presets import PRESETS, preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict
from harness.strategies import dense_configs

S, F = "sliding_attention", "full_attention"


def _spec(cfg: dict) -> Gemma4TextSpec:
    return text_spec_from_any(cfg)


def _tp_friendly(tp: int = 2, **changes) -> dict:
    """tiny-31b with enough KV heads on every layer to split over ``tp`` ranks."""
    return (
        preset_config_dict("tiny-31b")
        | {
            "num_attention_heads": 2 * tp,
            "num_key_value_heads": tp,
            "num_global_key_value_heads": tp,
            "vocab_size": 64 * tp,
        }
        | changes
    )


# ---- names and shapes: HF side ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_names_and_shapes_match_hf_model(name):
    """Catches: a renamed/missing HF key in the table, a wrong expected shape (e.g. global head dim)."""
    cfg = preset_config_dict(name)
    hf = hf_text_state_dict(build_reference_model(hf_text_config_from_any(cfg), torch.float32))
    spec = _spec(cfg)
    names = mapping.expected_hf_names(spec)
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(hf)
    for rule, layer in mapping.bound_rules(spec):
        for n in rule.hf:
            assert mapping.hf_shape(n, spec, layer) == tuple(hf[n].shape), n


# ---- names and TP layout: Megatron side -------------------------------------------------------------


def _megatron_model(cfg: dict):
    return build_gemma4_model(_spec(cfg), torch.float32)


@pytest.mark.parametrize(
    "cfg", [preset_config_dict("tiny-31b"), preset_config_dict("tiny-12b") | {"tie_word_embeddings": False}]
)
def test_table_covers_megatron_state_dict_with_its_partition_dims(cfg):
    """Every Megatron tensor is produced by exactly one rule, and the rule's TP layout is the partition dim
    Megatron's own layer declares. Catches: a linear sharded along the wrong dim, a norm sharded, a missing
    output layer when untied."""
    spec = _spec(cfg)
    model = _megatron_model(cfg)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    rules = {r.mcore: r for r, _ in mapping.bound_rules(spec)}
    assert sorted(rules) == sorted(own)
    params = dict(model.named_parameters())
    for name, rule in rules.items():
        p = params.get(name)
        parallel = bool(getattr(p, "tensor_model_parallel", False)) if p is not None else False
        if rule.tp_layout == mapping.REPLICATED:
            assert not parallel, name
        else:
            want_dim = 1 if rule.tp_layout == mapping.ROW else 0
            assert parallel and p.partition_dim == want_dim, (name, rule.tp_layout)


# ---- TP sharding: what each rank holds ----------------------------------------------------------------


def _megatron_column_or_row_shard(
    full: torch.Tensor, dim: int, rank: int, tp: int, stride: int = 1
) -> torch.Tensor:
    """The slice Megatron's own initialiser gives rank ``rank`` of a master weight (GLU fc1: stride 2)."""
    out_size, in_size = full.shape
    per = (out_size if dim == 0 else in_size) // tp
    shape = (per, in_size) if dim == 0 else (out_size, per)
    w = torch.empty(shape, dtype=full.dtype)
    _initialize_affine_weight_cpu(
        w,
        out_size,
        in_size,
        per,
        dim,
        lambda m: m.copy_(full),
        stride=stride,
        params_dtype=full.dtype,
        rank=rank,
        world_size=tp,
        skip_set_tensor_parallel_attributes=True,
    )
    return w


def _swiglu_placement(local: torch.Tensor, rank: int, tp: int) -> list[tuple[int, torch.Tensor]]:
    """(global row offset, rows) of rank ``rank``'s fc1 as Megatron's GLU checkpoint factory places them."""
    sh = ShardedTensor.from_rank_offsets("fc1", local, (0, rank, tp), replica_id=0)
    factory = apply_swiglu_sharded_factory(sh, ())
    pieces = factory.build_fn(factory.key, factory.data, factory.replica_id, None)
    return [(p.global_offset[0], p.data) for p in pieces]


def _check_tp_shards(cfg: dict, tp: int, seed: int = 0) -> None:
    spec = _spec(cfg)
    gen = torch.Generator().manual_seed(seed)
    for rule, layer in mapping.bound_rules(spec):
        hf = [torch.randn(mapping.hf_shape(n, spec, layer), generator=gen) for n in rule.hf]
        converted = mapping.rule_to_mcore(rule, hf, spec, layer)
        for full in converted if rule.is_expert else [converted]:
            _check_one(rule, layer, spec, hf, full, tp)


def _check_one(rule, layer, spec, hf, full, tp):
    """One Megatron tensor: every rank's shard against what Megatron's layers hold."""
    shards = sharding.shard_tp(rule, full, tp)
    assert len(shards) == tp
    assert torch.equal(sharding.gather_tp(rule, shards), full), rule.mcore
    for r, s in enumerate(shards):
        layout = rule.tp_layout
        if layout == mapping.REPLICATED:
            assert torch.equal(s, full)
        elif layout in (mapping.COLUMN, mapping.VOCAB, mapping.QKV_GROUPS, mapping.ROW):
            dim = 1 if layout == mapping.ROW else 0
            assert torch.equal(s, _megatron_column_or_row_shard(full, dim, r, tp)), (rule.mcore, r)
        elif layout == mapping.GLU:
            assert torch.equal(s, _megatron_column_or_row_shard(full, 0, r, tp, stride=2)), (rule.mcore, r)
            for offset, rows in _swiglu_placement(s, r, tp):
                assert torch.equal(full[offset : offset + rows.shape[0]], rows), (rule.mcore, r)
        if layout == mapping.VOCAB:
            lo, hi = VocabUtility.vocab_range_from_global_vocab_size(spec.vocab_size, r, tp)
            assert torch.equal(s, full[lo:hi])
        if layout == mapping.QKV_GROUPS and spec.num_kv_heads[layer] >= tp:
            # Rank r runs heads [r*nh/tp, ...) over KV groups [r*ng/tp, ...), group-interleaved.
            nh, ng, d = spec.num_attention_heads, spec.num_kv_heads[layer], spec.head_dims[layer]
            q = hf[0].reshape(nh, d, -1)[r * nh // tp : (r + 1) * nh // tp].reshape(-1, spec.hidden_size)
            k = hf[1].reshape(ng, d, -1)[r * ng // tp : (r + 1) * ng // tp].reshape(-1, spec.hidden_size)
            v = None
            if len(hf) == 3:
                v = hf[2].reshape(ng, d, -1)[r * ng // tp : (r + 1) * ng // tp].reshape(-1, spec.hidden_size)
            assert torch.equal(s, mapping.pack_qkv(q, k, v, nh // tp, ng // tp, d)), (rule.mcore, r)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_are_what_megatron_ranks_hold(tp):
    """Catches: qkv split by rows instead of KV groups, fc1 split as one block instead of [gate_r; up_r],
    row-parallel split along dim 0, vocab ranges off, replicated tensors sharded, experts not split as
    GLU/row."""
    _check_tp_shards(_tp_friendly(tp, tie_word_embeddings=False), tp)
    _check_tp_shards(_tp_friendly(tp, attention_k_eq_v=False), tp)
    _check_tp_shards(preset_config_dict("tiny-31b"), tp)  # one global KV head: rows split, groups replicated
    if tp <= 2:
        _check_tp_shards(preset_config_dict("tiny-26b-a4b"), tp)


@given(cfg=dense_configs(), tp=st.sampled_from([2, 4]))
@settings(max_examples=8)
def test_tp_shards_on_random_configs(cfg, tp):
    spec = _spec(cfg)
    try:
        sharding.check_tp(spec, tp)
    except InvalidInputError:
        return  # refusals are tested below
    _check_tp_shards(cfg, tp)


def test_tp_refusals_name_the_culprit():
    spec = _spec(preset_config_dict("tiny-31b"))
    for tp in (2, 4):  # fewer global KV heads than ranks: replicated at run time, split by rows on disk
        sharding.check_tp(spec, tp)
    odd = _spec(preset_config_dict("tiny-31b") | {"num_attention_heads": 6, "num_key_value_heads": 3})
    with pytest.raises(InvalidInputError, match=r"--tp 2: layer 0 \(sliding_attention\) has 3 KV heads"):
        sharding.check_tp(odd, 2)
    with pytest.raises(InvalidInputError, match="'vocab_size' 129"):
        sharding.check_tp(_spec(_tp_friendly(2, vocab_size=129)), 2)
    with pytest.raises(InvalidInputError, match="'intermediate_size' 129"):
        sharding.check_tp(_spec(_tp_friendly(2, intermediate_size=129)), 2)
    with pytest.raises(InvalidInputError, match="'num_attention_heads' 4"):
        sharding.check_tp(spec, 8)
    with pytest.raises(InvalidInputError, match="--tp must be a positive integer"):
        sharding.check_tp(spec, 0)
    with pytest.raises(InvalidInputError, match="--ep 2: this is a dense model"):
        sharding.check_ep(spec, 2)


def test_replicated_tensors_must_agree_across_ranks():
    rule = mapping.GLOBAL_RULES[1]
    a = torch.ones(4)
    with pytest.raises(InvalidInputError, match="rank 1 differs"):
        sharding.gather_tp(rule, [a, a + 1])


# ---- experts (MoE rows; the model is not built yet, so synthetic tensors) ------------------------------


def _moe_spec(**changes) -> Gemma4TextSpec:
    """The tiny 26B-A4B preset (8 experts, 16 wide) as the MoE model builds it."""
    return _spec(preset_config_dict("tiny-26b-a4b") | changes)


def _moe_hf(spec: Gemma4TextSpec, layer: int, gen) -> dict[str, torch.Tensor]:
    e, i, h = spec.num_experts, spec.moe_intermediate_size, spec.hidden_size
    return {
        f"layers.{layer}.experts.gate_up_proj": torch.randn(e, 2 * i, h, generator=gen),
        f"layers.{layer}.experts.down_proj": torch.randn(e, h, i, generator=gen),
    }


@pytest.mark.parametrize("num_experts, ep", [(8, 1), (8, 2), (8, 4), (8, 8), (6, 3)])
def test_expert_placement_is_blocked_by_rank(num_experts, ep):
    """Catches: local index offset, interleaved (e % ep) instead of blocked placement."""
    per = num_experts // ep
    seen = set()
    for e in range(num_experts):
        rank, local = mapping.expert_placement(e, num_experts, ep)
        assert (rank, local) == (e // per, e % per)
        assert mapping.global_expert_index(rank, local, num_experts, ep) == e
        seen.add((rank, local))
    assert len(seen) == num_experts


def test_expert_tensors_match_hf_experts_and_megatron_mlp():
    """gate_up_proj[e] is expert e's Megatron linear_fc1 ([gate; up]) and down_proj[e] its linear_fc2: HF's
    own Gemma4TextExperts and Megatron's own gated MLP compute the same thing for every expert."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    from gemma4.model.transformer_config import make_transformer_config
    from gemma4.runtime import init_single_process

    e_count, inter, hidden = 4, 6, 16
    cfg = hf_text_config_from_any(
        preset_config_dict("tiny-31b")
        | {"hidden_size": hidden, "num_experts": e_count, "moe_intermediate_size": inter}
    )
    experts = Gemma4TextExperts(cfg).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(
            torch.randn(e_count, 2 * inter, hidden, generator=gen, dtype=torch.float64)
        )
        experts.down_proj.copy_(torch.randn(e_count, hidden, inter, generator=gen, dtype=torch.float64))
    fc1 = mapping.split_experts(experts.gate_up_proj.detach())
    fc2 = mapping.split_experts(experts.down_proj.detach())
    assert torch.equal(mapping.stack_experts(fc1), experts.gate_up_proj)
    init_single_process()
    tcfg = make_transformer_config(
        _spec(preset_config_dict("tiny-31b") | {"hidden_size": hidden}), torch.float64, ffn_hidden_size=inter
    )
    mlp = MLP(tcfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)).double()
    x = torch.randn(5, hidden, generator=gen, dtype=torch.float64)
    for e in range(e_count):
        with torch.no_grad():
            mlp.linear_fc1.weight.copy_(fc1[e])
            mlp.linear_fc2.weight.copy_(fc2[e])
            ours, _ = mlp(x[:, None, :])
            ref = experts(x, torch.full((5, 1), e), torch.ones(5, 1, dtype=torch.float64))
        torch.testing.assert_close(ours[:, 0], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tp, ep", [(1, 1), (1, 2), (2, 2), (2, 4), (1, 8)])
def test_expert_rules_split_and_gather_bit_exact(tp, ep):
    """Per-rank expert tensors hold the right experts under local names, TP-split as GLU / row."""
    spec = _moe_spec()
    gen = torch.Generator().manual_seed(1)
    layer = 3
    hf = _moe_hf(spec, layer, gen)
    per = spec.num_experts // ep
    for rule in mapping._layer_rules(spec, layer):
        if not rule.is_expert:
            continue
        ranks = split_rule(rule, layer, [hf[rule.hf[0]]], spec, tp, ep)
        for (tp_rank, ep_rank), items in ranks.items():
            assert [n for n, _ in items] == [rule.mcore.format(e=i) for i in range(per)]
            for local, (_, t) in enumerate(items):
                global_e = ep_rank * per + local
                want = sharding.shard_tp(rule, hf[rule.hf[0]][global_e], tp)[tp_rank]
                assert torch.equal(t, want)
        stored = {rank: dict(items) for rank, items in ranks.items()}
        back = gather_rule(rule, layer, lambda rank, name, s=stored: s[rank][name], spec, tp, ep)
        assert [n for n, _ in back] == [rule.hf[0]] and torch.equal(back[0][1], hf[rule.hf[0]])


def test_moe_layer_rules_replace_the_dense_mlp_rows():
    spec = _moe_spec()
    mcore = [r.mcore for r in mapping._layer_rules(spec, 0)]
    assert "decoder.layers.0.mlp.linear_fc1.weight" not in mcore
    assert "decoder.layers.0.pre_mlp_layernorm.weight" not in mcore  # the identity on MoE layers
    assert "decoder.layers.0.mlp.dense_mlp.linear_fc1.weight" in mcore
    hf = [n for r in mapping._layer_rules(spec, 0) for n in r.hf]
    assert len(hf) == len(set(hf)) and "layers.0.router.per_expert_scale" in hf
    assert plan(spec, torch.bfloat16, 1, 2)[(0, 1)]  # the EP plan is derivable from the table


def test_ep_refusals():
    with pytest.raises(InvalidInputError, match="'num_experts' 8 is not divisible"):
        sharding.check_ep(_moe_spec(), 3)
    sharding.check_ep(_moe_spec(), 4)
    with pytest.raises(InvalidInputError, match="'moe_intermediate_size' 15 is not divisible"):
        sharding.check_tp(_moe_spec(moe_intermediate_size=15), 2)


# ---- dead K/V of KV-shared layers (E2B/E4B releases) --------------------------------------------------


def test_dead_kv_weights_of_shared_layers_are_dropped_with_a_note():
    names = []
    for layer in range(6):
        names += [
            f"layers.{layer}.self_attn.{p}" for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")
        ]
        names += [
            f"layers.{layer}.self_attn.{p}" for p in ("q_norm.weight", "k_norm.weight", "o_proj.weight")
        ]
    kept, dropped, notes = drop_dead_kv_shared_weights(names, num_hidden_layers=6, num_kv_shared_layers=2)
    assert sorted(dropped) == sorted(
        f"layers.{layer}.self_attn.{p}"
        for layer in (4, 5)
        for p in ("k_proj.weight", "v_proj.weight", "k_norm.weight")
    )
    assert "layers.4.self_attn.q_norm.weight" in kept and "layers.3.self_attn.k_proj.weight" in kept
    assert len(notes) == 1 and "KV-shared layers 4..5" in notes[0]
    assert drop_dead_kv_shared_weights(names, 6, 0) == (names, [], [])

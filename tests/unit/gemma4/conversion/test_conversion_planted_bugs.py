"""Every conversion check can fail: plant each classic converter bug and see the suite's own checks go red.

Each mutant is applied with ``monkeypatch`` to our converter only (HF and Megatron stay untouched oracles).
Symmetric bugs (the same mistake on import and export) survive a round trip by construction, so each
mutant names the check that must catch it, and that check is run exactly as the suite runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gemma4.conversion.mapping as mapping
import gemma4.conversion.sharding as sharding
from gemma4.errors import InvalidInputError
from harness.presets import preset_config_dict
from harness.testing.conversion import logits_failures, roundtrip_failures, save_hf_checkpoint, slime_args


def qkv_not_interleaved(mp):
    """Q, K, V concatenated whole instead of per KV group (symmetric: round trips still pass)."""

    def pack(q, k, v, nh, nkv, d):
        return torch.cat([q, k] + ([v] if v is not None else []), dim=0)

    def unpack(w, nh, nkv, d, has_v):
        q_rows = nh * d
        v = w[q_rows + nkv * d :] if has_v else None
        return w[:q_rows], w[q_rows : q_rows + nkv * d], v

    mp.setattr(mapping, "pack_qkv", pack)
    mp.setattr(mapping, "unpack_qkv", unpack)


def kv_v_slot_exported(mp):
    """K=V layers export a synthesised v_proj (a copy of K) that HF does not have."""
    orig = mapping.rule_to_hf

    def rule_to_hf(rule, w, spec, layer):
        out = orig(rule, w, spec, layer)
        if rule.kind == "qkv" and len(rule.hf) == 2:
            out.append((rule.hf[1].replace("k_proj", "v_proj"), out[1][1]))
        return out

    mp.setattr(mapping, "rule_to_hf", rule_to_hf)


def gate_up_swapped(mp):
    """fc1 = [up; gate] on import and export (symmetric)."""
    rules = tuple(
        mapping.Rule(r.hf[::-1], r.mcore, r.kind, r.tp) if r.kind == "fc1" else r for r in mapping.LAYER_RULES
    )
    mp.setattr(mapping, "LAYER_RULES", rules)


def expert_index_offset(mp):
    """Local expert index off by one on the EP rank."""
    orig = mapping.expert_placement

    def placement(expert, num_experts, ep):
        rank, local = orig(expert, num_experts, ep)
        return rank, (local + 1) % (num_experts // ep)

    mp.setattr(mapping, "expert_placement", placement)


def fc1_sharded_as_one_block(mp):
    """TP: rank r gets rows [r*2I/tp, ...) of [gate; up] instead of [gate_r; up_r] (symmetric)."""
    orig_shard, orig_gather = sharding.shard_tp, sharding.gather_tp
    plain = mapping.Rule((), "", tp=mapping.COLUMN)
    mp.setattr(
        sharding, "shard_tp", lambda r, t, tp, what=None: orig_shard(plain if r.kind == "fc1" else r, t, tp)
    )
    mp.setattr(sharding, "gather_tp", lambda r, s, what=None: orig_gather(plain if r.kind == "fc1" else r, s))


def row_parallel_split_on_dim0(mp):
    """TP: o_proj / fc2 split along the output dim (symmetric)."""
    orig_shard, orig_gather = sharding.shard_tp, sharding.gather_tp
    col = mapping.Rule((), "", tp=mapping.COLUMN)
    mp.setattr(
        sharding,
        "shard_tp",
        lambda r, t, tp, what=None: orig_shard(col if r.tp_layout == mapping.ROW else r, t, tp),
    )
    mp.setattr(
        sharding,
        "gather_tp",
        lambda r, s, what=None: orig_gather(col if r.tp_layout == mapping.ROW else r, s),
    )


def layer_scalar_dropped(mp):
    mp.setattr(mapping, "LAYER_RULES", tuple(r for r in mapping.LAYER_RULES if "layer_scalar" not in r.mcore))


def tied_head_exported_twice(mp):
    """The tied embedding is exported as embed_tokens and again as lm_head."""
    orig = mapping.rule_to_hf

    def rule_to_hf(rule, w, spec, layer):
        out = orig(rule, w, spec, layer)
        if rule.hf == ("embed_tokens.weight",) and spec.tie_word_embeddings:
            out.append(("lm_head.weight", w))
        return out

    mp.setattr(mapping, "rule_to_hf", rule_to_hf)


# ---- the checks, as the suite runs them -------------------------------------------------------------


def check_converted_logits(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-31b"), seed=5)
    from gemma4.conversion.convert import hf_to_mcore_dir

    hf_to_mcore_dir(hf, tmp_path / "mc")
    assert logits_failures(hf, tmp_path / "mc") == []


def check_roundtrip(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-31b"), seed=1)
    assert roundtrip_failures(hf, tmp_path) == []


def _sibling(name: str):
    """A test module beside this one, loaded by path (pytest runs in importlib mode: no sys.path games)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_planted_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_streaming(tmp_path):
    _check = _sibling("test_conversion_streaming")._check

    cfg = preset_config_dict("tiny-31b")
    assert _check(cfg, slime_args(hf_config=cfg)) == []


def check_tp_shards(tmp_path):
    _sibling("test_conversion_table").test_tp_shards_are_what_megatron_ranks_hold(2)


def check_expert_placement(tmp_path):
    table = _sibling("test_conversion_table")
    table.test_expert_placement_is_blocked_by_rank(8, 2)
    table.test_expert_rules_split_and_gather_bit_exact(1, 2)


# (mutant, [(check, what the red check must say)])
MUTANTS = [
    (qkv_not_interleaved, [(check_converted_logits, "logits max")]),
    (
        kv_v_slot_exported,
        [
            (check_streaming, r"self_attn\.v_proj\.weight' produced but not an HF tensor"),
            (check_roundtrip, r"v_proj\.weight' is not planned"),
        ],
    ),
    (gate_up_swapped, [(check_converted_logits, "logits max")]),
    (expert_index_offset, [(check_expert_placement, None)]),
    (fc1_sharded_as_one_block, [(check_tp_shards, "linear_fc1")]),
    (row_parallel_split_on_dim0, [(check_tp_shards, None)]),
    (
        layer_scalar_dropped,
        [
            (check_streaming, "layer_scalar"),
            (check_roundtrip, r"layer_scalar' is unexpected"),
            (check_converted_logits, "layer_scalar"),
        ],
    ),
    (
        tied_head_exported_twice,
        [
            (check_streaming, "'lm_head.weight' produced but not an HF tensor"),
            (check_roundtrip, "'lm_head.weight' is not planned"),
        ],
    ),
]
CASES = [(m, c, why) for m, checks in MUTANTS for c, why in checks]


@pytest.mark.parametrize(
    "check", sorted({c for _, c, _ in CASES}, key=lambda c: c.__name__), ids=lambda c: c.__name__
)
def test_checks_pass_without_mutants(tmp_path, check):
    check(tmp_path)


@pytest.mark.parametrize("mutant, check, why", CASES, ids=[f"{m.__name__}-{c.__name__}" for m, c, _ in CASES])
def test_planted_bug_turns_check_red(tmp_path, monkeypatch, mutant, check, why):
    mutant(monkeypatch)
    with pytest.raises((AssertionError, InvalidInputError, KeyError), match=why):
        check(tmp_path)

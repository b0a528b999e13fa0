"""Sequence layouts: zig-zag CP sharding, per-document positions, and the RoPE tables the model feeds layers.

RoPE is relative, so absolute positions that fail to restart per document change attention only through
rounding (invisible in fp64). These tests therefore check the positions themselves: the RoPE tables our
model hands every layer for a packed row / a CP rank must equal HF's tables of each document run alone.
"""

from __future__ import annotations

import pytest
import torch

import gemma4.model.gpt_model as gpt_model
import gemma4.model.sequence_layout as sequence_layout
from gemma4.config import FULL, SLIDING
from gemma4.conversion.mapping import hf_to_mcore
from gemma4.model import rope
from gemma4.model.sequence_layout import local_token_indices, make_layout, shard_for_cp, unshard_from_cp
from harness.distributed import Parallelism, run_distributed
from harness.parity import cu_seqlens_of, resolve_source
from harness.reference import build_reference_model, hf_text_state_dict

pytestmark = pytest.mark.xdist_group("multiprocess")


def test_zigzag_matches_megatron_convention():
    """Rank r holds chunks r and 2cp-1-r of every sequence (TE/Megatron load balancing)."""
    cu = torch.tensor([0, 8])
    assert local_token_indices(cu, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_token_indices(cu, 2, 1).tolist() == [2, 3, 4, 5]
    cu = torch.tensor([0, 8, 12])  # packed: each document is zig-zagged on its own
    assert local_token_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert local_token_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shard_unshard_round_trip(cp):
    cu = torch.tensor([0, 16, 24, 48])
    x = torch.arange(48).reshape(1, 48)
    parts = [shard_for_cp(x, cu, cp, r) for r in range(cp)]
    assert all(p.shape[1] == 48 // cp for p in parts)
    assert torch.equal(unshard_from_cp(parts, cu), x)


def test_positions_restart_per_document():
    layout = make_layout(12, cu_seqlens=torch.tensor([0, 4, 12]), cp_size=1)
    assert layout.q_pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    assert layout.q_doc.tolist() == [0] * 4 + [1] * 8


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([0, 5, 12]), r"sequence length 5 must be divisible by 2\*cp = 4"),
        (torch.tensor([0, 7]), r"cu_seqlens ends at 7 but the sequence holds 12 tokens \(6 x cp 2\)"),
        (torch.tensor([0, 4, 8]), r"cu_seqlens ends at 8 but the sequence holds 12 tokens"),
        (torch.tensor([0, 8, 4, 12]), r"cu_seqlens must be non-decreasing, got \[0, 8, 4, 12\]"),
    ],
)
def test_bad_cu_seqlens_are_refused(bad, message):
    """The refusal states the values it found (issue 17: a message reporting ``cu[1]`` for ``cu[-1]``
    survived)."""
    from gemma4.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        make_layout(6, cu_seqlens=bad, cp_size=2, cp_rank=0)


def _rank_rope_tables(rank, world, spec, weights, ids, cu, cp):
    """Run our model on this rank's tokens; return the cos/sin tables layer 0 and the first full layer got."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from gemma4.model.build import build_gemma4_model
    from gemma4.parallel import load_full_state_dict

    model = build_gemma4_model(spec, torch.float32, context_parallel_size=cp)
    load_full_state_dict(model, weights, 0, 1)
    seen = {}
    model.decoder.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("angles", kw["rotary_pos_emb"]), with_kwargs=True
    )
    local = shard_for_cp(ids, cu, cp, ps.get_context_parallel_rank() if cp > 1 else 0)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    with torch.no_grad():
        model(local, packed_seq_params=packed)
    angles = seen["angles"]
    tables = {t: rope.cos_sin(rope.angles_for(spec, angles, t), torch.float32) for t in (SLIDING, FULL)}
    return {"cp_rank": ps.get_context_parallel_rank() if cp > 1 else 0, "tables": tables}


def _check_tables(cp: int) -> None:
    src = resolve_source(preset="tiny-31b")
    spec = src.spec
    hf = build_reference_model(src.hf_config, torch.float32, seed=0)
    weights = hf_to_mcore(hf_text_state_dict(hf), spec)
    lengths = [8, 12, 4] if cp == 1 else [8, 16, 8]
    cu = cu_seqlens_of(lengths)
    ids = torch.randint(0, spec.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    args = (spec, weights, ids, cu, cp)
    if cp == 1:
        from gemma4.runtime import init_single_process

        init_single_process()
        results = [_rank_rope_tables(0, 1, *args)]
    else:
        results = run_distributed(_rank_rope_tables, Parallelism(cp=cp), *args)
    for layer_type in (SLIDING, FULL):
        # HF: each document alone, positions 0..L-1, its own rotary module.
        x = torch.zeros(1, 1, 1, dtype=torch.float32)
        per_doc = [hf.model.rotary_emb(x, torch.arange(n)[None], layer_type) for n in lengths]
        ref_cos = torch.cat([c[0] for c, _ in per_doc])
        ref_sin = torch.cat([s[0] for _, s in per_doc])
        for r in results:
            idx = local_token_indices(cu, cp, r["cp_rank"])
            cos, sin = r["tables"][layer_type]  # [s_local, 1, 1, d]
            assert torch.equal(cos[:, 0, 0], ref_cos[idx]), (layer_type, r["cp_rank"])
            assert torch.equal(sin[:, 0, 0], ref_sin[idx]), (layer_type, r["cp_rank"])


@pytest.mark.parametrize("cp", [1, 2])
def test_rope_tables_equal_hf_per_document(cp):
    """Catches: positions not restarted per document, CP chunks given the wrong positions."""
    _check_tables(cp)


@pytest.mark.parametrize("cp", [1, 2])
def test_planted_positions_not_restarted_is_caught(monkeypatch, cp):
    orig = sequence_layout.make_layout

    def make_layout(*args, **kwargs):
        lay = orig(*args, **kwargs)
        lay.q_pos = lay.q_index.clone()  # absolute positions in the packed row
        return lay

    monkeypatch.setattr(gpt_model, "make_layout", make_layout)
    with pytest.raises(AssertionError):
        _check_tables(cp)

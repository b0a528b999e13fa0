"""``gemma4.parallel.gather_like``: the exact inverse of ``shard_like``, on synthetic metadata and on the
real TP/EP-sharded Megatron models (whose ``partition_dim``/``partition_stride`` it reads).

Bugs caught: concatenating strided shards (GLU fc1 becomes [gate_0; up_0; gate_1; up_1]), gathering along
the wrong dim, a local expert index not mapped to its global index, a buffer (``layer_scalar``) left out.
"""

from __future__ import annotations

import pytest
import torch

from gemma4.errors import InvalidInputError
from gemma4.parallel import gather_like, shard_like


def _param(shape, dim, stride):
    p = torch.empty(shape)
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    return p


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_inverts_shard(tp, stride, dim):
    full_shape = [tp * stride * 2, tp * stride * 3]
    full = torch.randn(full_shape, generator=torch.Generator().manual_seed(tp * 10 + stride + dim))
    local = list(full_shape)
    local[dim] //= tp
    p = _param(local, dim, stride)
    shards = [shard_like(full, p, r, tp) for r in range(tp)]
    assert torch.equal(gather_like(shards, p), full)
    if stride > 1:  # the strided layout is not a plain concatenation
        assert not torch.equal(torch.cat(shards, dim=dim), full)


def test_replicated_and_single_rank_return_the_tensor():
    t = torch.randn(3, 4)
    assert gather_like([t, t.clone()], torch.empty(3, 4)) is t
    assert gather_like([t], _param((3, 4), 0, 2)) is t


def test_bad_shards_are_named():
    p = _param((4, 6), 0, 2)
    with pytest.raises(InvalidInputError, match="TP rank 1 has shape"):
        gather_like([torch.zeros(4, 6), torch.zeros(2, 6)], p)
    with pytest.raises(InvalidInputError, match="no shards"):
        gather_like([], p)


def _roundtrip_rank(rank, world, spec, full, tp, ep, sp):
    from megatron.core import parallel_state as ps

    from gemma4.model.build import build_gemma4_model
    from gemma4.parallel import load_full_state_dict
    from harness.e2e.sync import iter_global_params

    overrides = {"expert_model_parallel_size": ep} if spec.enable_moe else {}
    model = build_gemma4_model(
        spec, torch.float64, tensor_model_parallel_size=tp, sequence_parallel=sp, **overrides
    )
    load_full_state_dict(
        model, full, ps.get_tensor_model_parallel_rank(), tp, ps.get_expert_model_parallel_rank(), ep
    )
    return dict(iter_global_params(model))


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize(
    "preset,tp,ep", [("tiny-31b", 2, 1), ("tiny-26b-a4b", 2, 2)], ids=["dense-tp2", "moe-tp2-ep2"]
)
def test_sync_stream_rebuilds_the_full_weights_on_every_rank(preset, tp, ep):
    """``iter_global_params`` on sharded models yields exactly the TP 1 weights, names included."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from gemma4.conversion.mapping import hf_to_mcore
    from harness.distributed import Parallelism, run_distributed
    from harness.presets import preset_config_dict
    from harness.reference import build_reference_model, hf_text_state_dict

    cfg = hf_text_config_from_any(preset_config_dict(preset))
    spec = text_spec_from_hf(cfg)
    full = hf_to_mcore(hf_text_state_dict(build_reference_model(cfg, torch.float64, seed=3)), spec)
    sp = spec.enable_moe and tp > 1
    results = run_distributed(
        _roundtrip_rank, Parallelism(tp=tp, ep=ep, sequence_parallel=sp), spec, full, tp, ep, sp, timeout=120
    )
    from gemma4.slime.weight_sync import slime_global_expert_name

    # experts travel under slime's grouped global names (``experts.linear_fc1.weight{e}``), the rest as in TP 1
    full = {slime_global_expert_name(k, 0, 1, spec.num_experts or 1): v for k, v in full.items()}
    for rank, got in enumerate(results):
        assert sorted(got) == sorted(full), f"rank {rank}: names differ"
        bad = [k for k in full if not torch.equal(got[k], full[k])]
        assert not bad, f"rank {rank}: tensors differ: {bad[:5]}"

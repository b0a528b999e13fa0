"""The HF <-> Megatron mapping table: layouts, round trips and the key contract."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gemma4.config import hf_text_config_from_any, text_spec_from_any
from gemma4.conversion.mapping import expected_hf_names, hf_to_mcore, mcore_to_hf, pack_qkv, unpack_qkv
from gemma4.errors import InvalidInputError
from harness.presets import PRESETS, preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict


@given(
    ng=st.sampled_from([1, 2, 4]),
    qpg=st.sampled_from([1, 2, 3]),
    d=st.sampled_from([2, 4]),
    has_v=st.booleans(),
)
def test_qkv_layout_is_megatron_group_interleaved(ng, qpg, d, has_v):
    """Catches: Q/K/V concatenated instead of interleaved per KV group; V slot emitted on K=V layers."""
    h = 3
    nh = ng * qpg
    q = torch.arange(nh * d * h, dtype=torch.float64).reshape(nh * d, h)
    k = -torch.arange(ng * d * h, dtype=torch.float64).reshape(ng * d, h) - 1
    v = 1000 + torch.arange(ng * d * h, dtype=torch.float64).reshape(ng * d, h) if has_v else None
    packed = pack_qkv(q, k, v, nh, ng, d)
    slots = qpg + (2 if has_v else 1)
    assert packed.shape == (ng * slots * d, h)
    for g in range(ng):
        block = packed[g * slots * d : (g + 1) * slots * d]
        assert torch.equal(block[: qpg * d], q[g * qpg * d : (g + 1) * qpg * d])
        assert torch.equal(block[qpg * d : (qpg + 1) * d], k[g * d : (g + 1) * d])
        if has_v:
            assert torch.equal(block[(qpg + 1) * d :], v[g * d : (g + 1) * d])
    q2, k2, v2 = unpack_qkv(packed, nh, ng, d, has_v)
    assert torch.equal(q2, q) and torch.equal(k2, k)
    assert (v2 is None) == (not has_v) and (v2 is None or torch.equal(v2, v))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_is_bit_exact_and_keys_match(name):
    """Every HF key is produced exactly once, bit-exact; K=V layers have no v_proj."""
    spec = text_spec_from_any(preset_config_dict(name))
    hf = hf_text_state_dict(
        build_reference_model(hf_text_config_from_any(preset_config_dict(name)), torch.float32)
    )
    assert sorted(hf) == sorted(expected_hf_names(spec))
    assert not [k for k in hf if "v_proj" in k and not spec.has_v_proj(int(k.split(".")[1]))]
    back = mcore_to_hf(hf_to_mcore(hf, spec), spec)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert back[k].dtype == hf[k].dtype and torch.equal(back[k], hf[k]), k


def test_missing_tensor_is_named():
    spec = text_spec_from_any(preset_config_dict("tiny-31b"))
    with pytest.raises(InvalidInputError, match="layers.0.input_layernorm.weight"):
        hf_to_mcore({"embed_tokens.weight": torch.zeros(1), "norm.weight": torch.zeros(1)}, spec)

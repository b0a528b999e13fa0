"""``padding_mask`` (Megatron's ``GPTModel.forward`` argument) under tensor + sequence parallelism: scattered
along the sequence as ``GPTModel`` does, handed to the block, unused by Gemma 4's layers -- so the logits
equal those of the same forward without it.

No other test passed ``padding_mask`` with sequence parallelism on (issue 17: a mutant that broke its
transpose back to ``[b, s]`` survived as never executed). Catches: the mask not scattered (a shape error in
the block), transposed wrongly, or changing the computation.
"""

from __future__ import annotations

import pytest
import torch

from gemma4.config import hf_text_config_from_any, text_spec_from_any
from gemma4.conversion import mapping
from harness.distributed import Parallelism, run_distributed
from harness.parity import make_inputs
from harness.presets import preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict
from harness.tolerances import tolerance_for


def _rank(rank: int, world: int, spec, full, ids):
    from megatron.core import parallel_state as mpu

    from gemma4.model.build import build_gemma4_model
    from gemma4.parallel import load_full_state_dict

    model = build_gemma4_model(spec, torch.float64, tensor_model_parallel_size=world, sequence_parallel=True)
    load_full_state_dict(model, full, mpu.get_tensor_model_parallel_rank(), world)
    model.eval()
    padding = torch.zeros(ids.shape, dtype=torch.bool)
    padding[:, -2:] = True  # the last two tokens of each row are padding
    with torch.no_grad():
        plain = model(ids, runtime_gather_output=True)
        masked = model(ids, padding_mask=padding, runtime_gather_output=True)
    return plain, masked


@pytest.mark.xdist_group("multiprocess")
def test_padding_mask_under_tp2_sequence_parallel_leaves_the_logits_unchanged():
    spec = text_spec_from_any(preset_config_dict("tiny-31b"))
    ref = build_reference_model(
        hf_text_config_from_any(preset_config_dict("tiny-31b")), torch.float64, seed=4
    )
    full = mapping.hf_to_mcore(hf_text_state_dict(ref), spec)
    ids = make_inputs(spec, 2, 8, seed=1)
    for plain, masked in run_distributed(_rank, Parallelism(tp=2, sequence_parallel=True), spec, full, ids):
        assert masked.shape == plain.shape == (2, 8, spec.vocab_size)
        assert torch.equal(plain, masked)
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False).logits
    assert (plain - want).abs().max().item() <= tolerance_for(torch.float64).logits_max_abs

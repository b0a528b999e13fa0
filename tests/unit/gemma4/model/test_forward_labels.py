"""``Gemma4Model.forward(..., labels=...)``: the per-token loss Megatron's training loop (and slime's SFT
path) asks for, equal to the cross-entropy of HF's softcapped logits (issue 17: an entry point no parity run
took before).

Catches: the loss computed from logits before the softcap (or from untransposed ``[b, s]`` logits), labels
shifted a second time (Megatron's labels are already the next tokens), a reduction where Megatron returns
one loss per token, the tied head dropped on the loss path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma4.config import hf_text_config_from_any
from harness.parity import make_inputs
from harness.presets import preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict
from harness.testing.conversion import megatron_state_from_hf
from harness.tolerances import tolerance_for


@pytest.mark.parametrize(
    "preset, tied", [("tiny-31b", True), ("tiny-26b-a4b", True), ("tiny-e2b", True), ("tiny-12b", False)]
)
def test_loss_with_labels_equals_hf_cross_entropy(preset, tied):
    """Tied and untied heads (every preset is tied; the untied case is the one users of a fine-tuned
    checkpoint with its own ``lm_head`` meet)."""
    dtype = torch.float64
    cfg = hf_text_config_from_any(preset_config_dict(preset) | {"tie_word_embeddings": tied})
    ref = build_reference_model(cfg, dtype, seed=3)
    weights = hf_text_state_dict(ref)
    assert ("lm_head.weight" in weights) is not tied
    ours = megatron_state_from_hf(cfg, weights, dtype).eval()
    assert ours.share_embeddings_and_output_weights is tied
    spec = ours.gemma4
    ids = make_inputs(spec, 2, 12, seed=1)
    labels = torch.roll(ids, -1, dims=1)  # next tokens, as Megatron's data loader hands them
    with torch.no_grad():
        hf_logits = ref(input_ids=ids, use_cache=False).logits
        loss = ours(ids, labels=labels)
        logits = ours(ids)
    # Megatron-Core computes the loss in fp32 whatever the model dtype (``vocab_parallel_cross_entropy``
    # casts the logits, megatron/core/tensor_parallel/cross_entropy.py:28), so the oracle is the fp32
    # cross-entropy of HF's logits, at the fp32 bound of the policy.
    flat = hf_logits.float().reshape(-1, hf_logits.shape[-1])
    want = F.cross_entropy(flat, labels.reshape(-1), reduction="none")
    assert loss.shape == labels.shape  # one loss per token, [b, s]
    assert torch.isfinite(loss).all()
    loss_bound = tolerance_for(torch.float32).logits_max_abs
    assert (loss.reshape(-1).float() - want).abs().max().item() <= loss_bound
    # and the plain forward of the same model is HF's softcapped logits at the fp64 bound
    assert (logits - hf_logits).abs().max().item() <= tolerance_for(dtype).logits_max_abs


def test_loss_uses_the_labels_it_is_given():
    """A planted-bug style check of the test itself: other labels give another loss."""
    dtype = torch.float64
    cfg = hf_text_config_from_any(preset_config_dict("tiny-31b"))
    ref = build_reference_model(cfg, dtype, seed=3)
    ours = megatron_state_from_hf(cfg, hf_text_state_dict(ref), dtype).eval()
    ids = make_inputs(ours.gemma4, 1, 8, seed=2)
    with torch.no_grad():
        a = ours(ids, labels=torch.roll(ids, -1, dims=1))
        b = ours(ids, labels=ids)
    assert not torch.equal(a, b)

"""The ``TransformerConfig`` our model hands Megatron states Gemma 4's attention scale.

Our core attention scales by 1.0 even when the config says nothing, so the model's numbers cannot show a
missing ``softmax_scale``. Any Megatron attention that reads the config instead would scale by 1/sqrt(d):
Transformer Engine's ``DotProductAttention``, or a module a user swaps in through the ModuleSpec. Issue 17:
dropping ``softmax_scale=1.0`` survived.
"""

from __future__ import annotations

import pytest
import torch

from gemma4.config import text_spec_from_any
from gemma4.model.transformer_config import make_transformer_config
from harness.presets import PRESETS, preset_config_dict


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_states_the_unit_attention_scale_and_no_zero_centered_norm(preset):
    cfg = make_transformer_config(text_spec_from_any(preset_config_dict(preset)), torch.float32)
    assert cfg.softmax_scale == 1.0
    assert cfg.layernorm_zero_centered_gamma is False and cfg.qk_layernorm is True

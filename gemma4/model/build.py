"""Build a Gemma 4 Megatron model from any supported config form."""

from __future__ import annotations

from typing import Any

import torch

from gemma4.config import Gemma4TextSpec, text_spec_from_any
from gemma4.model.gpt_model import Gemma4Model
from gemma4.model.transformer_config import make_transformer_config
from gemma4.runtime import init_single_process


def build_gemma4_model(config: Any, dtype: torch.dtype = torch.float32, **config_overrides) -> Gemma4Model:
    """A single-process Gemma 4 ``GPTModel`` on CPU (weights are Megatron's init; load real ones after)."""
    spec = config if isinstance(config, Gemma4TextSpec) else text_spec_from_any(config)
    init_single_process()
    tconfig = make_transformer_config(spec, dtype, **config_overrides)
    return Gemma4Model(tconfig)

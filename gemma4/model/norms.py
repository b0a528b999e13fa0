"""RMSNorm with Gemma 4 semantics: ``x * (mean(x^2) + eps)^-0.5 * w`` with plain ``w`` (init 1).

Matches ``Gemma4RMSNorm`` (transformers 5.24): computed in fp32 (fp64 for fp64 runs), weight applied in
that precision, cast back to the input dtype. Gemma 1-3 used ``1 + w``; Gemma 4 does not (facts §6.3).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from gemma4.model.numerics import compute_dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4 RMSNorm over the last dim; ``weight=None`` is the scaleless variant (v_norm, router)."""
    cdt = compute_dtype(x.dtype)
    h = x.to(cdt)
    # HF uses torch.pow(mean + eps, -0.5) rather than rsqrt; keep the same op for bit-level fp32 parity.
    out = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.to(cdt)
    return out.to(x.dtype)


class Gemma4RMSNorm(MegatronModule):
    """Megatron-spec RMSNorm (``(config, hidden_size, eps)`` constructor) with Gemma 4 semantics."""

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, with_scale: bool = True
    ) -> None:
        super().__init__(config=config)
        self.eps = eps
        self.hidden_size = hidden_size
        if with_scale:
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
            # Under sequence parallelism each TP rank sees a slice of the sequence, so the weight's grad
            # is partial per rank; Megatron all-reduces params marked this way over TP.
            self.weight.sequence_parallel = config.sequence_parallel
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

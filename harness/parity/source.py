"""Step 1, what a parity run compares: an HF text config (a preset, a config.json or a checkpoint) and
optionally real weights, plus the run dtypes by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.config import Gemma4TextSpec, hf_text_config_from_any, text_spec_from_hf
from gemma4.errors import InvalidInputError

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ParitySource:
    """What a parity run compares: an HF text config and optionally real weights.

    Weights of a checkpoint are read only by :meth:`materialize` (``loader``), after the run's memory
    estimate passed; every tensor must be finite (a non-finite weight is invalid input, not a port bug).
    """

    label: str
    hf_config: Any
    spec: Gemma4TextSpec
    weights: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    loader: Callable[[], dict[str, torch.Tensor]] | None = None

    def materialize(self) -> None:
        """Read the checkpoint's weights (once) and refuse non-finite values, naming the tensor."""
        if self.weights is None and self.loader is not None:
            self.weights, self.loader = self.loader(), None
        for name, t in (self.weights or {}).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                kinds = [k for k, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(t).any())]
                raise InvalidInputError(
                    f"{self.label}: tensor {name!r} holds {bad} non-finite value(s) ({' and '.join(kinds)}); "
                    "parity needs finite weights (this is the input, not the port)"
                )


def materialize(source: ParitySource) -> ParitySource:
    """:meth:`ParitySource.materialize` as a pipeline step; returns ``source``."""
    source.materialize()
    return source


def resolve_source(
    preset: str | None = None, hf_config: str | Path | None = None, hf_checkpoint: str | Path | None = None
) -> ParitySource:
    """Exactly one of ``preset``, ``hf_config`` (config.json) or ``hf_checkpoint`` (directory)."""
    chosen = [x for x in (preset, hf_config, hf_checkpoint) if x is not None]
    if len(chosen) != 1:
        raise InvalidInputError("give exactly one of --preset, --hf-config, --hf-checkpoint")
    if preset is not None:
        from harness.presets import preset_config_dict

        cfg = hf_text_config_from_any(preset_config_dict(preset))
        return ParitySource(f"preset:{preset}", cfg, text_spec_from_hf(cfg))
    if hf_config is not None:
        cfg = hf_text_config_from_any(Path(hf_config))
        return ParitySource(f"config:{hf_config}", cfg, text_spec_from_hf(cfg))

    from gemma4.conversion.hf_io import open_hf_checkpoint

    # Validated like the converter validates: names, shapes, dtypes against config.json; dead K/V of
    # KV-shared layers and a tied lm_head copy are dropped with a note.
    ckpt = open_hf_checkpoint(Path(hf_checkpoint))
    return ParitySource(
        f"checkpoint:{hf_checkpoint}",
        ckpt.hf_config,
        ckpt.spec,
        None,
        list(ckpt.notes),
        loader=lambda: {name: ckpt.read(name) for name in ckpt.tensors},
    )

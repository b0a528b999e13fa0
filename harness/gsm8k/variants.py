"""What each ``--variant`` of the GSM8K smoke needs and how it is parallelised.

The numbers are sized for one node of 80 GB GPUs with slime's colocated mode (training and SGLang share
the GPUs). They are a starting point, not measured: no GPU run has been recorded yet (see README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One model size: its model-argument script, GPUs and parallel layout."""

    name: str
    description: str
    gpus: int
    min_gpu_memory_gib: float
    tp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    rollout_gpus_per_engine: int = 1
    max_tokens_per_gpu: int = 4096
    max_response_len: int = 512
    timeout_s: int = 3600

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


VARIANTS: dict[str, Variant] = {
    "31b": Variant(
        "31b",
        "Gemma 4 31B dense (60 layers, TP 8: 16 sliding / 4 full KV heads, the full ones replicated)",
        gpus=8,
        min_gpu_memory_gib=75.0,
        tp=8,
        sequence_parallel=True,
        rollout_gpus_per_engine=8,
        timeout_s=5400,
    ),
    "26b-a4b": Variant(
        "26b-a4b",
        "Gemma 4 26B-A4B MoE (128 experts, top-8; EP 8, experts not tensor-parallel)",
        gpus=8,
        min_gpu_memory_gib=75.0,
        ep=8,
        rollout_gpus_per_engine=8,
        timeout_s=5400,
    ),
    "12b": Variant(
        "12b",
        "Gemma 4 12B dense (48 layers, TP 4: 8 sliding / 1 full KV head, the full one replicated)",
        gpus=4,
        min_gpu_memory_gib=75.0,
        tp=4,
        sequence_parallel=True,
        rollout_gpus_per_engine=4,
        timeout_s=3600,
    ),
    "tiny": Variant(
        "tiny",
        "tiny-31b structure with the real vocabulary, random weights (plumbing: weight sync, log-probs)",
        gpus=1,
        min_gpu_memory_gib=10.0,
        max_response_len=128,
        timeout_s=1800,
    ),
}


@dataclass(frozen=True)
class RunSettings:
    """The RL run: a few rollouts of a small batch (slime's short GSM8K CI shape)."""

    num_rollout: int = 3
    rollout_batch_size: int = 8
    n_samples_per_prompt: int = 4
    rollout_temperature: float = 1.0
    lr: float = 1e-6
    input_key: str = "messages"
    label_key: str = "label"

    @property
    def global_batch_size(self) -> int:
        """One optimizer step per rollout: every sample of the rollout in one global batch."""
        return self.rollout_batch_size * self.n_samples_per_prompt


def tiny_e2e_config() -> dict[str, Any]:
    """The ``tiny`` variant's HF config: the ``tiny-31b`` preset with Gemma 4's 262144-token vocabulary, so
    the real tokenizer works (``scripts/models/gemma4-tiny.sh`` describes exactly this)."""
    from harness.presets import preset_config_dict

    return preset_config_dict("tiny-31b") | {"vocab_size": 262144}

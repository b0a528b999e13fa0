"""Memory estimate of a run, checked before anything is allocated.

A config is only numbers: ``vocab_size: 10**12`` or ``--seq-len 10**9`` would make the run try to allocate
terabytes and die with a traceback (or swap for minutes). Every command that builds models therefore
estimates the bytes its run needs from the config and the flags alone, and refuses with exit 2 and the
estimate when it exceeds the memory available now, unless ``--force``.

The estimate is an upper-bound-style sum of what a parity run holds at its peak (see :func:`estimate_run`):
model copies (HF reference, its state dict mapped to Megatron names, our model; with gradients each again;
for fp32/bf16 also the exact-fp64 reference of the noise floor), the captured activations of both sides,
the logits and their fp64 comparison copies, the attention scores of one layer, and a per-layer overhead
for the module objects. It is meant to catch the absurd (orders of magnitude), not to predict RSS to the
megabyte: the tiny presets estimate a few MB.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma4.config import Gemma4TextSpec
from gemma4.errors import InvalidInputError

#: Python/torch object overhead per decoder layer per model instance (modules, parameters' metadata,
#: hooks). Measured: building tiny-31b-shaped models with 8 and 200 layers differs by ~60 KiB per layer per
#: model; 256 KiB leaves margin.
LAYER_OVERHEAD_BYTES = 256 * 1024

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2}


def _dtype_bytes(dtype: object) -> int:
    name = str(dtype).removeprefix("torch.")
    return DTYPE_BYTES.get(name, 8)


def _layer_params(spec: Gemma4TextSpec, layer: int) -> int:
    from gemma4.conversion.mapping import _layer_rules, hf_shape

    total = 0
    for rule in _layer_rules(spec, layer):
        for name in rule.hf:
            n = 1
            for d in hf_shape(name, spec, layer):
                n *= d
            total += n
    return total


def parameter_count(spec: Gemma4TextSpec) -> int:
    """Number of parameters of the text model (HF tensors; a tied head counted once)."""
    from gemma4.conversion.mapping import global_rules, hf_shape

    total = 0
    for rule in global_rules(spec):
        for name in rule.hf:
            n = 1
            for d in hf_shape(name, spec, None):
                n *= d
            total += n
    # Layers with the same type, KV-sharing mode and MLP width have the same parameter count: count one of
    # each kind (a config with 10^5 layers must be estimated in milliseconds).
    kinds: dict[tuple, tuple[int, int]] = {}
    for i in range(spec.num_layers):
        key = (
            spec.layer_types[i],
            spec.kv_sharing[i] if spec.kv_sharing else None,
            spec.intermediate_sizes[i] if spec.intermediate_sizes else None,
        )
        first, count = kinds.get(key, (i, 0))
        kinds[key] = (first, count + 1)
    for first, count in kinds.values():
        total += _layer_params(spec, first) * count
    return total


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs, by part."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """``"1.2 TB (weights 1.1 TB, activations ...)"``."""
        shown = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.parts.items() if v)
        return f"{human_bytes(self.total)} ({shown})"


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def estimate_run(
    spec: Gemma4TextSpec, dtype: object, batch: int, seq_len: int, *, grads: bool, world_size: int = 1
) -> Estimate:
    """Estimated peak bytes of a parity-style run (both models, ``batch x seq_len`` tokens)."""
    s = _dtype_bytes(dtype)
    p = parameter_count(spec)
    exact_copy = 8 * p if s != 8 else 0  # the exact-fp64 reference of the noise floor (fp32/bf16 runs)
    copies = 3 + (3 if grads else 0)  # HF model, mapped state dict, our model (+ their gradients)
    tokens = batch * seq_len
    points = 4 * spec.num_layers + 3  # captured activations per side
    acts = 2 * points * tokens * spec.hidden_size * s
    if grads:  # autograd keeps about a dozen hidden-sized tensors per layer on each side
        acts += (
            2 * 12 * spec.num_layers * tokens * max(spec.hidden_size, max(spec.intermediate_sizes or (0,)))
        )
    heads = spec.num_attention_heads
    scores = 4 * batch * heads * seq_len * seq_len * (2 if grads else 1) * (spec.num_layers if grads else 1)
    logits = tokens * spec.vocab_size * (2 * s + 6 * 8)  # both sides + fp64 copies for the comparison
    overhead = 3 * spec.num_layers * LAYER_OVERHEAD_BYTES
    return Estimate(
        {
            "weights": copies * p * s + exact_copy,
            "activations": acts,
            "attention scores": scores,
            "logits": logits,
            "module overhead": overhead,
            "process copies": max(0, world_size - 1) * p * s,
        }
    )


def available_bytes() -> int:
    """Memory available to a new allocation now (``MemAvailable``), via psutil."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_budget(estimate: Estimate, *, force: bool, what: str) -> str | None:
    """Refuse (``InvalidInputError``, exit 2) when ``estimate`` exceeds the available memory, unless
    ``force``; returns a note when forced past the limit."""
    avail = available_bytes()
    if estimate.total <= avail:
        return None
    message = (
        f"{what}: needs an estimated {estimate.describe()}, but only {human_bytes(avail)} of memory are "
        "available; lower --batch / --seq-len, use a smaller config, or pass --force to try anyway"
    )
    if not force:
        raise InvalidInputError(message)
    return "forced past the memory estimate: " + message

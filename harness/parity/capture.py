"""Where both sides are observed: forward hooks at the same capture points, in forward order::

    embedding, layer.{i}.attention, layer.{i}.mlp, [layer.{i}.experts,] layer.{i}.output, ..., final_norm, logits

so the first point that exceeds the tolerance localises a bug to a layer and submodule.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from gemma4.config import Gemma4TextSpec


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_hf(model: torch.nn.Module, store: dict[str, torch.Tensor]):
    """Record the reference's activations (``[b, s, h]``) at the standard capture points."""
    m = model.model
    hooks = [
        m.embed_tokens.register_forward_hook(
            lambda mod, i, o: store.__setitem__("embedding", o.detach().clone())
        )
    ]
    for idx, layer in enumerate(m.layers):
        points = [(layer.self_attn, "attention"), (layer.mlp, "mlp"), (layer, "output")]
        if getattr(layer, "enable_moe_block", False):  # routed experts after their output norm
            points.insert(2, (layer.post_feedforward_layernorm_2, "experts"))
        for sub, name in points:
            key = f"layer.{idx}.{name}"
            hooks.append(
                sub.register_forward_hook(
                    lambda mod, i, o, key=key: store.__setitem__(key, _first(o).detach().clone())
                )
            )
    hooks.append(
        m.norm.register_forward_hook(lambda mod, i, o: store.__setitem__("final_norm", o.detach().clone()))
    )
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def capture_mcore(model: torch.nn.Module, store: dict[str, torch.Tensor]):
    """Record our activations at the same points, transposed from ``[s, b, h]`` to ``[b, s, h]``."""

    def put(key, t):
        store[key] = t.detach().transpose(0, 1).clone()

    layers = model.decoder.layers
    hooks = [
        layers[0].register_forward_pre_hook(
            lambda mod, args, kwargs: put(
                "embedding", kwargs.get("hidden_states", args[0] if args else None)
            ),
            with_kwargs=True,
        )
    ]
    for idx, layer in enumerate(layers):
        points = [(layer.self_attention, "attention"), (layer.mlp, "mlp"), (layer, "output")]
        if hasattr(layer.mlp, "dense_mlp"):  # MoE block: "mlp" is its dense branch, like HF's layer.mlp
            points = [
                (layer.self_attention, "attention"),
                (layer.mlp.dense_mlp, "mlp"),
                (layer.mlp.post_experts_layernorm, "experts"),
                (layer, "output"),
            ]
        for sub, name in points:
            key = f"layer.{idx}.{name}"
            hooks.append(sub.register_forward_hook(lambda mod, i, o, key=key: put(key, _first(o))))
    hooks.append(model.decoder.final_layernorm.register_forward_hook(lambda mod, i, o: put("final_norm", o)))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def capture_order(spec: Gemma4TextSpec) -> list[str]:
    """Capture point names in forward order."""
    names = ["embedding"]
    for i in range(spec.num_layers):
        names += [f"layer.{i}.attention", f"layer.{i}.mlp"]
        if spec.enable_moe:
            names.append(f"layer.{i}.experts")
        names.append(f"layer.{i}.output")
    return names + ["final_norm", "logits"]


def describe_point(spec: Gemma4TextSpec, name: str) -> str:
    """Human-readable capture point, e.g. ``layer 3 (full_attention) attention``."""
    if name.startswith("layer."):
        _, idx, sub = name.split(".")
        return f"layer {idx} ({spec.layer_types[int(idx)]}) {sub}"
    return name

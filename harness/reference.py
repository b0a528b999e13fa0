"""The HF reference: ``Gemma4ForCausalLM`` with eager attention, random non-trivial weights, exact-fp64 mode.

* Weights are drawn from a seeded generator so that no op can hide: projections ~ N(0, 1/fan_in), embeddings
  ~ N(0, 1), every norm weight ~ U(0.4, 1.6) (a ``1 + w`` bug or a dropped norm weight shows) except the
  q/k norms, ~ U(0.25, 0.6): with attention scale 1.0 their product sets the attention-logit scale, and
  larger values make softmaxes so peaked that rounding noise is amplified chaotically through the layers
  (HF fp32 itself then drifts 1e-4 from exact fp64 on tiny-31b); ``layer_scalar`` in [0.5, 0.8] or
  [1.25, 1.6] (never 1).
* bf16/fp32 runs use stock HF. fp64 runs remove exactly the casts that cap stock HF near 1e-5 in fp64
  (facts §6.23): ``Gemma4RMSNorm`` computing in fp32, RoPE ``inv_freq``/cos/sin built in fp32, the
  eager attention softmax in fp32, and the MoE router softmax in fp32. MoE experts always run HF's eager
  loop (``experts_implementation="eager"``), the reference implementation. Nothing else is changed; the patches live on this model instance (and
  a separately registered attention implementation), never on the transformers classes.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch

EXACT_ATTENTION = "gemma4_harness_exact_eager"


def _draw_weights(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.35 + 0.25)
            elif name.endswith("router.proj.weight"):
                # The router's input is RMS-normed and scaled by H^-0.5, so N(0, 2^2) weights give logits of
                # std ~2: routing is decisive but not saturated, and the renormalised weights matter.
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 1.2 + 0.4)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) * 1.2 + 0.4)
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("layer_scalar"):
                u = torch.rand(b.shape, generator=gen)
                low = torch.rand(b.shape, generator=gen) < 0.5
                b.copy_(torch.where(low, 0.5 + 0.3 * u, 1.25 + 0.35 * u))


def _reset_rope_buffers(model: torch.nn.Module) -> None:
    """Keep RoPE ``inv_freq`` in fp32 after ``.to(bf16)``, as ``from_pretrained(dtype=bf16)`` leaves them."""
    rotary = model.model.rotary_emb
    for layer_type, init_fn in rotary.rope_init_fns.items():
        inv, _ = init_fn(rotary.config.per_layer_config[layer_type], None, layer_type=layer_type)
        setattr(rotary, f"{layer_type}_inv_freq", inv)
        setattr(rotary, f"{layer_type}_original_inv_freq", inv.clone())


# ---- exact-fp64 patches ---------------------------------------------------------------------------------


def _exact_rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Gemma4RMSNorm.forward without `.float()`: same formula, computed in the input dtype (fp64).
    normed = self._norm(hidden_states)
    if self.with_scale:
        normed = normed * self.weight.to(hidden_states.dtype)
    return normed.type_as(hidden_states)


def _fp64_inv_freq(rope_params: Mapping[str, Any], head_dim: int) -> torch.Tensor:
    """HF's default / proportional ``inv_freq`` formulas (modeling_rope_utils) evaluated in fp64."""
    theta = rope_params["rope_theta"]
    if rope_params.get("rope_type", "default") == "proportional":
        n_rot = int(rope_params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        rotated = 1.0 / (
            theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).to(torch.float64) / head_dim)
        )
        inv = torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot, dtype=torch.float64)])
        return inv / rope_params.get("factor", 1.0)
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _exact_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
    # Gemma4TextRotaryEmbedding.forward with fp64 positions and inv_freq instead of `.float()`.
    inv_freq = self._fp64_inv_freq[layer_type].to(x.device)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    scaling = getattr(self, f"{layer_type}_attention_scaling")
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def _exact_eager_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs
):
    # transformers' eager_attention_forward with the softmax in the query dtype instead of fp32.
    from transformers.models.gemma4.modeling_gemma4 import repeat_kv

    if scaling is None:
        scaling = module.head_dim**-0.5
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        attn_weights = torch.tanh(attn_weights / softcap) * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=query.dtype)
    attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _exact_router_forward(self, hidden_states: torch.Tensor):
    # Gemma4TextRouter.forward with the softmax in the input dtype (fp64) instead of fp32.
    hidden_states = self.norm(hidden_states)
    hidden_states = hidden_states * self.scale * self.scalar_root_size
    expert_scores = self.proj(hidden_states)
    router_probabilities = torch.nn.functional.softmax(expert_scores, dim=-1, dtype=hidden_states.dtype)
    top_k_weights, top_k_index = torch.topk(router_probabilities, k=self.config.top_k_experts, dim=-1)
    top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)
    top_k_weights = top_k_weights * self.per_expert_scale[top_k_index]
    return router_probabilities, top_k_weights, top_k_index


def _register_exact_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EXACT_ATTENTION, _exact_eager_attention)
    AttentionMaskInterface.register(EXACT_ATTENTION, eager_mask)


def make_exact_fp64(model: torch.nn.Module) -> None:
    """Remove HF's fp32 casts from an fp64 ``Gemma4ForCausalLM`` instance (and only those)."""
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4RMSNorm,
        Gemma4TextRotaryEmbedding,
        Gemma4TextRouter,
    )

    for module in model.modules():
        if isinstance(module, Gemma4TextRouter):
            module.forward = types.MethodType(_exact_router_forward, module)
        elif isinstance(module, Gemma4RMSNorm):
            module.forward = types.MethodType(_exact_rmsnorm_forward, module)
        elif isinstance(module, Gemma4TextRotaryEmbedding):
            module._fp64_inv_freq = {
                t: _fp64_inv_freq(
                    module.config.rope_parameters[t], module.config.per_layer_config[t].head_dim
                )
                for t in module.rope_init_fns
            }
            module.forward = types.MethodType(_exact_rotary_forward, module)
    _register_exact_attention()
    model.config._attn_implementation = EXACT_ATTENTION


# ---- building -------------------------------------------------------------------------------------------


def build_reference_model(
    hf_text_config: Any,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    weights: Mapping[str, torch.Tensor] | None = None,
    exact_fp64: bool | None = None,
) -> torch.nn.Module:
    """A ``Gemma4ForCausalLM`` in eval mode: random weights from ``seed``, or ``weights`` (HF names, relative
    to ``model.``; ``lm_head.weight`` absolute) loaded strictly. ``exact_fp64`` defaults to ``dtype == fp64``.
    """
    from transformers import Gemma4ForCausalLM

    from gemma4.errors import InvalidInputError

    torch.manual_seed(seed)
    config = type(hf_text_config).from_dict(hf_text_config.to_dict())
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = Gemma4ForCausalLM(config)
    if weights is None:
        _draw_weights(model, seed)
    else:
        full = {("model." + k if not k.startswith("lm_head.") else k): v for k, v in weights.items()}
        if config.tie_word_embeddings:
            full.setdefault("lm_head.weight", full.get("model.embed_tokens.weight"))
        own = model.state_dict()
        missing = sorted(k for k in own if k not in full)
        unexpected = sorted(k for k in full if k not in own)
        if missing or unexpected:
            raise InvalidInputError(
                f"HF weights do not match the config: missing {missing}, unexpected {unexpected}"
            )
        with torch.no_grad():
            for k, t in own.items():
                if tuple(full[k].shape) != tuple(t.shape):
                    raise InvalidInputError(
                        f"tensor {k!r} has shape {tuple(full[k].shape)}; the config implies {tuple(t.shape)}"
                    )
                t.copy_(full[k].to(t.dtype))
    model = model.to(dtype)
    _reset_rope_buffers(model)
    if exact_fp64 if exact_fp64 is not None else dtype == torch.float64:
        if dtype != torch.float64:
            raise ValueError("exact_fp64 needs dtype float64")
        make_exact_fp64(model)
    model.eval()
    return model


def hf_text_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Relative HF tensor names (``model.`` stripped; ``lm_head.weight`` kept only when untied)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model."):
            out[k[len("model.") :]] = v
        elif k == "lm_head.weight" and not model.config.tie_word_embeddings:
            out[k] = v
    return out

"""Every check can fail: plant each classic Gemma 4 porting bug and see parity go red at the right place.

Each mutant is applied with ``monkeypatch`` to *our* side only (HF stays the untouched oracle); the parity
run must fail and its ``first_divergence`` must name the component the bug lives in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gemma4.conversion.mapping as mapping
import gemma4.model.attention as attention
import gemma4.model.core_attention as core_attention
import gemma4.model.gpt_model as gpt_model
import gemma4.model.layer as layer
import gemma4.model.norms as norms
import gemma4.model.rope as rope
import gemma4.model.transformer_config as transformer_config
from harness.parity import resolve_source, run_parity


def window_off_by_one(mp):
    orig = core_attention.allowed_mask
    mp.setattr(
        core_attention,
        "allowed_mask",
        lambda qd, qp, kd, kp, w: orig(qd, qp, kd, kp, None if w is None else w + 1),
    )


def rope_interleaved_pairs(mp):
    def rotate_half_gptj(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    mp.setattr(rope, "rotate_half", rotate_half_gptj)


def proportional_rope_as_rotary_percent(mp):
    orig = rope.inv_freq

    def inv_freq(spec, head_dim, dtype=torch.float32):
        if spec.rope_type != "proportional":
            return orig(spec, head_dim, dtype)
        rot = int(spec.partial_rotary_factor * head_dim)  # Megatron: rotary dim as the exponent denominator
        f = 1.0 / (spec.theta ** (torch.arange(0, rot, 2, dtype=dtype) / rot))
        return torch.cat([f, torch.zeros(head_dim // 2 - rot // 2, dtype=dtype)])

    mp.setattr(rope, "inv_freq", inv_freq)


def _qkv_mutant(mp, transform):
    orig = attention.Gemma4SelfAttention.get_query_key_value_tensors

    def patched(self, hidden_states, *args, **kwargs):
        q, k, v = orig(self, hidden_states, *args, **kwargs)
        return transform(self, hidden_states, q, k, v)

    mp.setattr(attention.Gemma4SelfAttention, "get_query_key_value_tensors", patched)


def v_after_k_norm(mp):
    # K=V layers: value = v_norm(k_norm(raw K)) instead of v_norm(raw K).
    _qkv_mutant(mp, lambda self, h, q, k, v: (q, k, norms.rms_norm(k, None, 1e-6) if self.k_eq_v else v))


def v_norm_missing(mp):
    def transform(self, h, q, k, v):
        mixed, _ = self.linear_qkv(h)
        d, ng = self.hidden_size_per_attention_head, self.num_query_groups_per_partition
        mixed = mixed.view(*mixed.shape[:-1], ng, -1)
        qpg = self.num_attention_heads_per_partition // ng
        raw_v = mixed[..., qpg * d : (qpg + 1) * d] if self.k_eq_v else mixed[..., (qpg + 1) * d :]
        return q, k, raw_v

    _qkv_mutant(mp, transform)


def attention_scale_inv_sqrt_d(mp):
    orig = core_attention.Gemma4CoreAttention.forward
    mp.setattr(
        core_attention.Gemma4CoreAttention,
        "forward",
        lambda self, q, k, v, mask, **kw: orig(self, q * q.shape[-1] ** -0.5, k, v, mask, **kw),
    )


def rmsnorm_one_plus_w(mp):
    orig = norms.rms_norm
    mp.setattr(norms, "rms_norm", lambda x, w, eps: orig(x, None if w is None else 1 + w, eps))


def erf_gelu(mp):
    mp.setattr(transformer_config, "gelu_tanh", F.gelu)


def softcap_missing(mp):
    mp.setattr(gpt_model, "softcap", lambda logits, cap: logits)


def embed_scale_python_float(mp):
    mp.setattr(gpt_model, "embedding_scale", lambda hidden, dtype: hidden**0.5)


def layer_scalar_dropped(mp):
    orig = layer.Gemma4TransformerLayer.forward

    def forward(self, *args, **kwargs):
        out, ctx = orig(self, *args, **kwargs)
        return out / self.layer_scalar, ctx

    mp.setattr(layer.Gemma4TransformerLayer, "forward", forward)


def qkv_not_interleaved(mp):
    def pack(q, k, v, nh, nkv, d):
        return torch.cat([q, k] + ([v] if v is not None else []), dim=0)

    mp.setattr(mapping, "pack_qkv", pack)


def gate_up_swapped(mp):
    rules = tuple(
        mapping.Rule(r.hf[::-1], r.mcore, r.kind) if r.kind == "fc1" else r for r in mapping.LAYER_RULES
    )
    mp.setattr(mapping, "LAYER_RULES", rules)


# (mutant, dtype, expected first divergence, preset). tiny-12b has H = 48, whose sqrt is not bf16-exact.
MUTANTS = [
    (window_off_by_one, torch.float64, "layer 0 (sliding_attention) attention"),
    (rope_interleaved_pairs, torch.float64, "layer 0 (sliding_attention) attention"),
    (proportional_rope_as_rotary_percent, torch.float64, "layer 3 (full_attention) attention"),
    (v_after_k_norm, torch.float64, "layer 3 (full_attention) attention"),
    (v_norm_missing, torch.float64, "layer 0 (sliding_attention) attention"),
    (attention_scale_inv_sqrt_d, torch.float64, "layer 0 (sliding_attention) attention"),
    (rmsnorm_one_plus_w, torch.float64, "layer 0 (sliding_attention) attention"),
    (erf_gelu, torch.float64, "layer 0 (sliding_attention) mlp"),
    (softcap_missing, torch.float64, "logits"),
    (softcap_missing, torch.float32, "logits"),
    (embed_scale_python_float, torch.bfloat16, "embedding", "tiny-12b"),
    (layer_scalar_dropped, torch.float64, "layer 0 (sliding_attention) output"),
    (qkv_not_interleaved, torch.float64, "layer 0 (sliding_attention) attention"),
    (gate_up_swapped, torch.float64, "layer 0 (sliding_attention) mlp"),
]


@pytest.mark.parametrize(
    "case", MUTANTS, ids=[f"{c[0].__name__}-{str(c[1]).removeprefix('torch.')}" for c in MUTANTS]
)
def test_planted_bug_turns_parity_red(monkeypatch, case):
    mutant, dtype, where, *preset = case
    mutant(monkeypatch)
    result = run_parity(resolve_source(preset=preset[0] if preset else "tiny-31b"), dtype)
    assert not result["pass"], f"{mutant.__name__} was not detected: {result['metrics']}"
    assert result["first_divergence"] == where, result["failures"]

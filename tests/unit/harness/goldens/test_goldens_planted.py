"""The goldens tell "our model moved" (exit 1) from "HF moved" (exit 3): bugs planted on each side.

Our side: a RoPE pair-layout bug in the model, a wrong RoPE frequency formula, gate/up swapped in the
conversion. HF side (standing in for a transformers upgrade): RMSNorm's normalisation off by 0.1 %, and the
reference weight draw changed. Each is applied with monkeypatch to one side only.
"""

from __future__ import annotations

import torch
from transformers.models.gemma4 import modeling_gemma4

import gemma4.conversion.mapping as mapping
import gemma4.model.rope as rope
import harness.reference as reference
from harness.goldens.check import check_goldens
from harness.goldens.outcome import HF_DRIFT, PASS, REGRESSION

SMALL = {
    "forward": "forward/tiny-12b/float64",
    "rope": "rope/tiny-12b/float32",
    "weights": "weights/tiny-12b/float32",
}


def outcomes(goldens, *families):
    report = check_goldens(goldens, [SMALL[f] for f in families])
    return report.exit_code, {o.case: o for o in report.outcomes}


def test_model_bug_is_a_regression_at_the_first_layer(recorded, monkeypatch):
    def rotate_half_gptj(x):  # GPT-J interleaved pairs instead of HF's (i, i + d/2)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    monkeypatch.setattr(rope, "rotate_half", rotate_half_gptj)
    code, out = outcomes(recorded, "forward")
    o = out["forward/tiny-12b/float64"]
    assert code == 1 and o.status == REGRESSION
    assert "our model moved away from golden forward/tiny-12b/float64." in o.message
    assert (
        "first at layer 0 (sliding_attention) attention" in o.message
        and "HF still matches the golden" in o.message
    )


def test_rope_formula_bug_is_a_regression_of_the_rope_tables(recorded, monkeypatch):
    orig = rope.inv_freq

    def rotary_percent(spec, head_dim, dtype=torch.float32):  # Megatron's rotary_percent denominator
        if spec.rope_type != "proportional":
            return orig(spec, head_dim, dtype)
        rot = int(spec.partial_rotary_factor * head_dim)
        f = 1.0 / (spec.theta ** (torch.arange(0, rot, 2, dtype=dtype) / rot))
        return torch.cat([f, torch.zeros(head_dim // 2 - rot // 2, dtype=dtype)])

    monkeypatch.setattr(rope, "inv_freq", rotary_percent)
    code, out = outcomes(recorded, "rope")
    o = out["rope/tiny-12b/float32"]
    assert code == 1 and o.status == REGRESSION
    assert "our RoPE tables moved away from golden" in o.message and "full_attention" in o.message


def test_conversion_bug_is_a_regression_of_the_weight_checksums(recorded, monkeypatch):
    orig = mapping.hf_to_mcore

    def gate_up_swapped(hf, spec):
        out = orig(hf, spec)
        for name in [n for n in out if n.endswith("linear_fc1.weight")]:
            gate, up = out[name].chunk(2, dim=0)
            out[name] = torch.cat([up, gate])
        return out

    monkeypatch.setattr(mapping, "hf_to_mcore", gate_up_swapped)
    code, out = outcomes(recorded, "weights")
    o = out["weights/tiny-12b/float32"]
    assert code == 1 and o.status == REGRESSION
    assert "converted Megatron weights moved away" in o.message
    assert (
        "7 of 79 tensors differ (first: decoder.layers.0.mlp.linear_fc1.weight (sha256 differs))" in o.message
    )


def test_hf_change_is_hf_drift_not_a_regression(recorded, monkeypatch):
    orig = modeling_gemma4.Gemma4RMSNorm._norm
    monkeypatch.setattr(modeling_gemma4.Gemma4RMSNorm, "_norm", lambda self, x: orig(self, x) * 1.001)
    code, out = outcomes(recorded, "forward", "rope", "weights")
    assert code == 3
    o = out["forward/tiny-12b/float64"]
    assert o.status == HF_DRIFT
    assert "HF moved away from golden" in o.message and "our model still matches the golden" in o.message
    assert out["rope/tiny-12b/float32"].status == PASS and out["weights/tiny-12b/float32"].status == PASS


def test_reference_weights_change_is_hf_drift_on_both_families(recorded, monkeypatch):
    orig = reference._draw_weights

    def draw(model, seed):
        orig(model, seed)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)

    monkeypatch.setattr(reference, "_draw_weights", draw)
    code, out = outcomes(recorded, "forward", "weights")
    assert code == 3
    w = out["weights/tiny-12b/float32"]
    assert w.status == HF_DRIFT and "(first: norm.weight (sha256 differs))" in w.message
    f = out["forward/tiny-12b/float64"]
    assert f.status == HF_DRIFT and "both moved away" in f.message and "first at final_norm" in f.message

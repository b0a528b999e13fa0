"""The parity package's judge, result and import-lightness, without building models."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from harness.compare import LogitStats, TensorDiff
from harness.parity.judge import GradientErrors, judge, point_diffs, worst
from harness.presets import preset_config_dict
from harness.tolerances import FP32_STOCK, FP64_EXACT

NAN = float("nan")


def _spec():
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf

    return text_spec_from_hf(hf_text_config_from_any(preset_config_dict("tiny-31b")))


def _points(spec, bad: dict[str, float] | None = None) -> dict[str, TensorDiff]:
    from harness.parity.capture import capture_order

    bad = bad or {}
    return {n: TensorDiff(bad.get(n, 1e-14), 0.0, 1.0, ()) for n in capture_order(spec)}


GOOD_STATS = LogitStats(kl_mean=0.0, kl_max=0.0, argmax_agreement=1.0, max_abs_logprob=0.0)


def test_clean_run_passes():
    v = judge(_points(_spec()), GOOD_STATS, FP64_EXACT, _spec())
    assert v.passed and v.failures == [] and v.first_divergence is None and v.first_bad is None


@pytest.mark.parametrize("value", [1e-3, NAN, math.inf])
def test_a_bad_activation_fails_and_is_localised(value):
    """NaN anywhere is a failure, never a pass (``max`` alone would skip a NaN between finite values)."""
    spec = _spec()
    v = judge(_points(spec, {"layer.2.mlp": value}), GOOD_STATS, FP64_EXACT, spec)
    assert not v.passed
    assert v.first_divergence == "layer 2 (sliding_attention) mlp"
    assert v.first_bad.startswith("layer 2 (sliding_attention) mlp (scaled error")
    assert v.failures[0].startswith("activations max scaled error")


def test_nan_logits_and_kl_fail():
    spec = _spec()
    stats = LogitStats(kl_mean=NAN, kl_max=NAN, argmax_agreement=1.0, max_abs_logprob=NAN)
    v = judge(_points(spec, {"logits": NAN}), stats, FP64_EXACT, spec)
    assert v.first_divergence == "logits"
    assert [f.split()[0] for f in v.failures] == ["logits", "mean"]


def test_kl_alone_fails_with_the_goldens_wording():
    spec = _spec()
    stats = LogitStats(kl_mean=1e-6, kl_max=1e-6, argmax_agreement=1.0, max_abs_logprob=0.0)
    v = judge(_points(spec), stats, FP32_STOCK, spec)
    assert v.failures == ["mean KL 1.000e-06 > 1e-09"]
    assert v.first_divergence == "logits" and v.first_bad == "logits (mean KL 1.00e-06 > 1e-09)"


def test_gradients_missing_and_nan():
    spec = _spec()
    g = GradientErrors(
        {"a": {"scaled": 1e-15}, "b": {"scaled": NAN}, "c": {"scaled": 1.0}}, [("d", "tp rank 0, cp rank 0")]
    )
    assert g.worst_parameter == "b" and math.isnan(g.max_scaled)
    v = judge(_points(spec), GOOD_STATS, FP64_EXACT, spec, g)
    assert v.failures[0] == "parameter d got no gradient (tp rank 0, cp rank 0)"
    assert v.failures[1].startswith("gradient of b: scaled error nan")
    assert v.first_divergence == "gradient of b"


def test_worst_and_point_diffs():
    assert worst([]) == 0.0 and worst([1.0, 3.0, 2.0]) == 3.0 and math.isnan(worst([1.0, NAN, 2.0]))
    t = torch.ones(2, 3)
    d = point_diffs({"x": t + 1, "logits": t}, {"x": t, "logits": t}, ["x", "logits"])
    assert list(d) == ["x", "logits"] and d["x"].max_abs == 1.0 and d["logits"].max_abs == 0.0


def test_forward_goldens_use_the_same_judge():
    from harness.goldens.forward import judge as golden_judge

    spec = _spec()
    from harness.parity.capture import capture_order

    names = capture_order(spec)
    ref = {n: torch.ones(1, 2, 4, dtype=torch.float64) for n in names}
    now = {n: t.clone() for n, t in ref.items()}
    now["layer.1.attention"] = now["layer.1.attention"] + 1e-3
    j = golden_judge(now, ref, names, spec, FP64_EXACT)
    assert not j.ok and j.first_bad == "layer 1 (sliding_attention) attention (scaled error 1.00e-03 > 1e-09)"
    assert j.to_json()["per_point"]["layer.1.attention"] == pytest.approx(1e-3)


def test_layout_and_report_layouts_do_not_import_torch():
    code = "import sys, harness.parity, harness.parity.layout, harness.report.layouts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

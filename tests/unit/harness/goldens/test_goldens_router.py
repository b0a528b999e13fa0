"""The ``router`` golden family: HF's MoE router decisions, checked against HF now and against our router.

Round trip through the real CLI, then bugs planted with monkeypatch on one side only: our router relabelling
two experts (changed indices: a regression naming layer and token), our router dropping the top-k
renormalisation (same indices, wrong weights), our MoE layer feeding its router the normed residual (the
in-model router input), and HF's router changing (HF drift, exit 3). Plus a damaged golden (exit 4) and the
ill-conditioning guard of ``record``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save
from transformers.models.gemma4 import modeling_gemma4

import gemma4.model.moe as moe
import harness.goldens.router as router
from gemma4.errors import InvalidInputError
from harness.cli import main
from harness.goldens.check import check_goldens
from harness.goldens.outcome import HF_DRIFT, INTEGRITY, REGRESSION
from harness.goldens.record import record_goldens
from harness.goldens.registry import Case, select
from harness.goldens.store import sha256_bytes
from harness.tolerances import FP32_STOCK, tolerance_for

F64, F32 = "router/tiny-26b-a4b/float64", "router/tiny-26b-a4b/float32"


@pytest.fixture(scope="module")
def recorded_router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both router cases, recorded once for this module (read-only: copy before damaging)."""
    directory = tmp_path_factory.mktemp("router") / "goldens"
    record_goldens(directory, ["router"], command="pytest fixture")
    return directory


def outcome(goldens: Path, case: str):
    report = check_goldens(goldens, [case])
    return report.exit_code, report.outcomes[0]


def test_router_cases_are_the_moe_presets_in_both_dtypes():
    cases = select(["router"])
    assert [c.name for c in cases] == [F64, F32]


def test_round_trip_records_hf_decisions_and_check_passes(recorded_router, capsys):
    rc = main(["goldens", "check", "--only", "router", "--goldens-dir", str(recorded_router)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "OK (2 ok; exit 0)" in out
    assert "288 token decisions in 6 layers match" in out

    manifest = json.loads((recorded_router / "manifest.json").read_text())
    for name, dtype in ((F64, torch.float64), (F32, torch.float32)):
        entry = manifest["cases"][name]
        assert entry["tolerance"] == tolerance_for(dtype).name
        contents = entry["contents"]
        assert (
            contents["layers"] == list(range(6)) and contents["top_k"] == 2 and contents["num_experts"] == 8
        )
        assert min(contents["min_topk_margin"].values()) > 2 * tolerance_for(dtype).activations_max_scaled
        (rel,) = entry["files"]
        t = load((recorded_router / rel).read_bytes())
        assert t["input_ids"].shape == (2, 24)
        for i in range(6):
            probs, w, idx = (t[f"layer.{i}.{k}"] for k in ("probs", "top_k_weights", "top_k_index"))
            assert (
                t[f"layer.{i}.router_input"].shape == (48, 64) and t[f"layer.{i}.router_input"].dtype == dtype
            )
            assert probs.shape == (48, 8) and probs.dtype == dtype and w.shape == (48, 2)
            assert idx.dtype == torch.int64 and torch.equal(idx, probs.topk(2, dim=-1).indices)
            torch.testing.assert_close(probs.sum(-1), torch.ones(48, dtype=dtype))


def test_changed_expert_index_is_a_regression_naming_layer_and_token(recorded_router, monkeypatch):
    orig = moe.Gemma4Router.route

    def experts_0_and_1_swapped(self, hidden):  # a mislabelled expert (e.g. a wrong expert-weight order)
        probs, w, idx = orig(self, hidden)
        return probs, w, torch.where(idx == 0, 1, torch.where(idx == 1, 0, idx))

    monkeypatch.setattr(moe.Gemma4Router, "route", experts_0_and_1_swapped)
    code, o = outcome(recorded_router, F64)
    assert code == 1 and o.status == REGRESSION
    assert f"our router moved away from golden {F64}." in o.message
    assert re.search(r"\d+ of 288 token decisions \(top-k experts\) differ", o.message), o.message
    assert re.search(
        r"first at layer 0 token \d+ \(batch \d, position \d+\): experts \[\d, \d\] vs golden \[\d, \d\]",
        o.message,
    ), o.message
    assert "HF still matches the golden" in o.message


def test_dropped_renormalisation_is_a_regression_of_the_weights(recorded_router, monkeypatch):
    from gemma4.model.norms import rms_norm

    def route_without_renormalisation(self, hidden):
        z = rms_norm(hidden, None, self.eps) * self.scale * hidden.shape[-1] ** -0.5
        probs = torch.softmax(torch.nn.functional.linear(z, self.weight), dim=-1, dtype=hidden.dtype)
        top_w, top_i = torch.topk(probs, k=self.topk, dim=-1)
        return probs, top_w * self.per_expert_scale[top_i], top_i

    monkeypatch.setattr(moe.Gemma4Router, "route", route_without_renormalisation)
    code, o = outcome(recorded_router, F32)
    assert code == 1 and o.status == REGRESSION
    assert "the top-k experts still match; first at layer 0 top_k_weights at token" in o.message, o.message


def test_router_fed_the_wrong_tensor_is_a_regression_of_the_router_input(recorded_router, monkeypatch):
    orig = moe.Gemma4MoELayer.route

    def route_normed(self, hidden_states, padding_mask=None):  # the experts' normed copy, not the residual
        return orig(self, self.pre_experts_layernorm(hidden_states), padding_mask)

    monkeypatch.setattr(moe.Gemma4MoELayer, "route", route_normed)
    code, o = outcome(recorded_router, F64)
    assert code == 1 and o.status == REGRESSION
    assert "first at layer 0 router input at token" in o.message, o.message


def test_hf_router_change_is_hf_drift(recorded_router, monkeypatch):
    orig = modeling_gemma4.Gemma4TextRouter.forward

    def without_per_expert_scale(self, hidden_states):  # standing in for a transformers upgrade
        probs, w, idx = orig(self, hidden_states)
        return probs, w / self.per_expert_scale[idx], idx

    monkeypatch.setattr(modeling_gemma4.Gemma4TextRouter, "forward", without_per_expert_scale)
    code, o = outcome(recorded_router, F32)
    assert code == 3 and o.status == HF_DRIFT
    assert "HF's router moved away from golden" in o.message and "ours still match the golden" in o.message


def test_missing_tensor_is_a_broken_golden(recorded_router, tmp_path):
    goldens = tmp_path / "goldens"
    shutil.copytree(recorded_router, goldens)
    manifest = json.loads((goldens / "manifest.json").read_text())
    (rel,) = manifest["cases"][F32]["files"]
    tensors = load((goldens / rel).read_bytes())
    del tensors["layer.3.top_k_index"]
    data = save(tensors)
    (goldens / rel).write_bytes(data)
    manifest["cases"][F32]["files"][rel] = sha256_bytes(data)
    (goldens / "manifest.json").write_text(json.dumps(manifest))
    code, o = outcome(goldens, F32)
    assert code == 4 and o.status == INTEGRITY
    assert f"{goldens / rel}: unreadable, tensor 'layer.3.top_k_index' is missing" in o.message


def test_record_refuses_ill_conditioned_decisions(monkeypatch):
    loose = type(FP32_STOCK)(**{**FP32_STOCK.to_json(), "name": "loose", "activations_max_scaled": 0.5})
    monkeypatch.setattr(router, "tolerance_for", lambda dtype: loose)
    with pytest.raises(
        InvalidInputError, match=r"router decisions are ill-conditioned: layer \d has a top-k"
    ):
        router.record(Case("router", "tiny-26b-a4b", "float32"))

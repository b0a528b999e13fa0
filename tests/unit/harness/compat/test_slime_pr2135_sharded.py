"""slime PR #2135 under TP 2 and EP 2 (forked gloo ranks, HF weights cut by Megatron's partition attributes
after their bridge), what it declares not applicable, and the report's n/a rows for it.

* TP 2 (tiny-31b: 1 global KV head, fewer than the TP ranks) and EP 2 (tiny-26b-a4b): fp64 parity at the
  exact gate with every fix; without the ``kv_heads_below_tp`` fix, TP 2 crashes in their K=V split
  (finding 6).
* Gradients under TP 2 / EP 2: finalized as Megatron's DDP does, made whole (TP shards joined, experts
  gathered), exported under HF names by their export, gated at the fp64 exact gate (planted: no
  data-parallel sum under EP).
* Layouts the plugin does not run (CP, SP, TP with EP) are declared with the reason: exit 2 from
  ``parity``, n/a rows in the report (never failures); the report's exit code comes from the applicable
  rows (as written, tiny-31b fails on finding 1 next to its n/a rows); a planted ``supports()`` that lies
  (claims the E-series) fails its rows.

Skips (with how to provide it) without ``shared/reference/slime-pr2135``; fails under
``GEMMA4_REQUIRE_SHARED=1`` (CI).
"""

from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main
from harness.distributed import DistributedRunError
from harness.parity import RunLayout, resolve_source, run_parity

ALL = ("layer_types", "global_rope", "sliding_window", "fp64_islands", "kv_heads_below_tp")


@pytest.fixture(scope="module")
def slime(require_reference):
    require_reference("slime-pr2135")
    require_reference("megatron-lm")
    from harness.impls.slime_pr2135 import SlimePR2135

    return SlimePR2135


def _run(impl, preset, layout, **kw):
    return run_parity(
        resolve_source(preset=preset), torch.float64, impl=impl, seq_len=12, layout=layout, **kw
    )


def _hf_parameter_count(preset: str) -> int:
    from harness.reference import build_reference_model

    hf = build_reference_model(resolve_source(preset=preset).hf_config, torch.float64, seed=0)
    return sum(1 for _ in hf.named_parameters())


def test_tp2_parity_and_gradients_at_the_fp64_exact_gate(slime):
    r = _run(slime(ALL), "tiny-31b", RunLayout(tp=2), grads=True)
    assert r.passed, r.summary()
    assert r.tolerance.name == "fp64-exact-cross-framework" and r.layout.name == "tp2"
    assert r.logits.max_abs < 1e-11 and r.activations_max_scaled < 1e-11, r.summary()
    # gradients: TP shards joined, exported under HF names, every HF parameter compared
    assert len(r.grads.per_parameter) == _hf_parameter_count("tiny-31b") and not r.grads.missing
    assert r.grads.max_scaled < 1e-11, r.summary()


def test_ep2_parity_and_gradients_at_the_fp64_exact_gate(slime):
    r = _run(slime(ALL), "tiny-26b-a4b", RunLayout(ep=2), grads=True)
    assert r.passed, r.summary()
    assert r.layout.ep == 2 and r.logits.max_abs < 1e-11 and r.activations_max_scaled < 1e-11, r.summary()
    assert len(r.grads.per_parameter) == _hf_parameter_count("tiny-26b-a4b") and not r.grads.missing
    assert r.grads.max_scaled < 1e-11, r.summary()


def test_ep2_gradients_not_summed_over_data_parallel_ranks_fail(slime, monkeypatch):
    import harness.parity.megatron_side as megatron_side

    monkeypatch.setattr(megatron_side, "finalize_grads", lambda model, config: None)  # planted
    r = _run(slime(ALL), "tiny-26b-a4b", RunLayout(ep=2), grads=True)
    assert not r.passed and r.first_divergence.startswith("gradient of "), r.summary()
    assert r.logits.max_abs < 1e-11  # the forward is untouched


def test_k_eq_v_global_layers_break_when_tp_exceeds_their_kv_heads(slime):
    # Finding 6: tiny-31b's full layers have 1 KV head; at TP 2 their _split_qkv_global_k_eq_v views the
    # local shard as whole groups.
    without = tuple(f for f in ALL if f != "kv_heads_below_tp")
    with pytest.raises(DistributedRunError, match=r"RuntimeError: shape .* is invalid for input of size"):
        _run(slime(without), "tiny-31b", RunLayout(tp=2))


@pytest.mark.parametrize(
    "layout, grads, reason",
    [
        (RunLayout(cp=2), False, "context parallelism"),
        (RunLayout(tp=2, sequence_parallel=True), False, "sequence parallelism"),
        (RunLayout(tp=2, ep=2), True, "TP and EP together"),
    ],
)
def test_layouts_it_does_not_run_are_declared(slime, layout, grads, reason):
    from harness.parity.run import UnsupportedByImplementation

    with pytest.raises(UnsupportedByImplementation, match=reason) as info:
        _run(slime(ALL), "tiny-31b", layout, grads=grads)
    assert info.value.declared and reason in info.value.reason


def _report(tmp_path, impl, presets, layouts):
    out = tmp_path / "report"
    argv = ["report", "--out", str(out), "--junit", str(tmp_path / "j.xml"), "--impl", impl, "--no-goldens"]
    argv += ["--dtype", "float64", "--seq-len", "8"]
    argv += [a for p in presets for a in ("--preset", p)] + [a for lay in layouts for a in ("--layout", lay)]
    rc = main(argv)
    return rc, (out / "summary.md").read_text(), json.loads((out / "results.json").read_text())


def test_report_shows_what_the_plugin_cannot_run_as_not_applicable(slime, tmp_path, capsys):
    rc, md, results = _report(tmp_path, "slime-pr2135+fixes", ["tiny-31b", "tiny-e2b"], ["tp1", "cp2"])
    assert rc == 0, capsys.readouterr().out
    status = {(r["preset"], r["layout"]): r["status"] for r in results["rows"]}
    assert status == {
        ("tiny-31b", "tp1"): "PASS",
        ("tiny-31b", "cp2"): "n/a",
        ("tiny-e2b", "tp1"): "n/a",
        ("tiny-e2b", "cp2"): "n/a",
    }
    assert "4 parity runs (1 applicable, 3 not applicable to slime-pr2135+fixes)" in md
    assert "not applicable: per-layer embeddings (E-series" in md
    assert "not applicable: context parallelism" in md
    assert results["failures"] == []


def test_report_exit_code_comes_from_applicable_rows(slime, tmp_path, capsys):
    rc, md, results = _report(tmp_path, "slime-pr2135", ["tiny-31b"], ["tp1", "cp2"])
    assert rc == 1  # as written: finding 1 fails the applicable tp1 row
    assert [r["status"] for r in results["rows"]] == ["FAIL", "n/a"]
    assert len(results["failures"]) == 1 and "tiny-31b float64 tp1" in results["failures"][0]


def test_planted_supports_that_lies_fails_its_rows(slime, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(slime, "supports", lambda self, spec: None)  # claims the E-series
    rc, md, results = _report(tmp_path, "slime-pr2135+fixes", ["tiny-e2b"], ["tp1"])
    assert rc == 1
    (row,) = results["rows"]
    assert row["status"] == "FAIL" and row["not_applicable"] is None and row["error"]

"""Pins what the harness finds in slime PR #2135 (``harness/impls/slime_pr2135.py``, ``docs/slime-pr2135.md``)
through the same pipeline as our model: ``run_parity(impl=SlimePR2135(fixes=...))``. With every fix, fp64
parity holds at the exact gate (dense and MoE); dropping any one fix breaks it at the layer and submodule its
finding names; without the ``fp64_islands`` fix the fp64 exact gate is reported as not applicable (fp32
islands). Skips (with how to provide it) when ``shared/reference/slime-pr2135`` is absent; the registry and
``--impl`` tests run everywhere."""

from __future__ import annotations

import pytest
import torch

from gemma4.errors import InvalidInputError
from harness.cli import main
from harness.impls import resolve_impl
from harness.parity import resolve_source, run_parity
from harness.parity.impl import OURS, ImplementationUnderTest

ALL = ("layer_types", "global_rope", "sliding_window", "fp64_islands")


@pytest.fixture(scope="module")
def slime(require_reference):
    require_reference("slime-pr2135")
    require_reference("megatron-lm")
    from harness.impls.slime_pr2135 import SlimePR2135

    return SlimePR2135


def _without(name):
    return tuple(f for f in ALL if f != name)


def _run(impl, preset="tiny-31b", **kw):
    return run_parity(resolve_source(preset=preset), torch.float64, impl=impl, **kw)


@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b"])
def test_all_fixes_give_fp64_parity_at_the_exact_gate(slime, preset):
    r = _run(slime(ALL), preset)
    assert r.passed, r.summary()
    assert r.tolerance.name == "fp64-exact-cross-framework"
    assert r.logits.max_abs < 1e-11 and r.activations_max_scaled < 1e-11, r.summary()
    assert not any("not captured" in n for n in r.notes)  # every capture point is compared


def test_layer_types_from_first_full_layer_breaks_irregular_schedules(slime):
    # tiny-31b is S S S F S S F F: pattern 4 builds layer 6 (full) as sliding -> its weights do not fit.
    r = _run(slime(_without("layer_types")), seq_len=4)
    assert not r.passed
    assert r.first_divergence == "layer 6 (full_attention) attention", r.summary()
    assert "decoder.layers.6.self_attention" in r.failures[0]


def test_global_layers_get_wrong_rope(slime):
    # seq 4 < window 5: the window plays no part; the first full layer (3) diverges in its attention.
    r = _run(slime(_without("global_rope")), seq_len=4)
    assert not r.passed
    assert r.first_divergence == "layer 3 (full_attention) attention", r.summary()
    assert r.per_point["layer.2.output"].scaled < 1e-11 and r.per_point["layer.3.output"].scaled > 1e-2
    assert _run(slime(ALL), seq_len=4).passed


def test_unpacked_sliding_layers_ignore_the_window(slime):
    assert _run(slime(_without("sliding_window")), seq_len=4).passed  # shorter than the window: no effect
    r = _run(slime(_without("sliding_window")), seq_len=24)
    assert not r.passed
    assert r.first_divergence == "layer 0 (sliding_attention) attention", r.summary()
    assert r.per_point["layer.0.attention"].scaled > 1e-2


def test_fp32_islands_make_the_fp64_gate_not_applicable(slime):
    impl = slime(_without("fp64_islands"))
    assert impl.precision == "fp32-islands"
    r = _run(impl)
    assert r.tolerance.name == "fp64-fp32-islands"
    assert any("not applicable: fp32 islands" in n for n in r.notes), r.notes
    assert r.passed, r.summary()  # at its declared precision
    assert 1e-9 < r.activations_max_scaled < 1e-5 and 1e-9 < r.logits.max_abs < 1e-4, r.summary()


def test_unsupported_configs_are_reported_as_such(slime):
    from harness.parity.run import UnsupportedByImplementation

    with pytest.raises(UnsupportedByImplementation, match="per-layer embeddings"):
        _run(slime(ALL), "tiny-e2b")


# ---- the registry and --impl (no reference data needed) -------------------------------------------------


def test_registry_names_and_module_attr():
    assert resolve_impl(None) is OURS and resolve_impl("gemma4-mcore") is OURS
    assert resolve_impl("harness.parity.impl:OURS") is OURS
    as_written, fixed = resolve_impl("slime-pr2135"), resolve_impl("slime-pr2135+fixes")
    assert isinstance(as_written, ImplementationUnderTest) and isinstance(fixed, ImplementationUnderTest)
    assert (as_written.name, as_written.precision) == ("slime-pr2135", "fp32-islands")
    assert (fixed.name, fixed.precision) == ("slime-pr2135+fixes", "reordered")
    assert resolve_impl("slime-pr2135+global_rope").fixes == ("global_rope",)


@pytest.mark.parametrize(
    "name, match",
    [
        ("nope", "--impl 'nope' is unknown"),
        ("no_such_module_xyz:X", "--impl no_such_module_xyz:X: cannot import"),
        ("harness.parity.impl:NOPE", "has no attribute"),
        ("harness.parity.impl:PRECISIONS", "not an implementation under test"),
        ("slime-pr2135+bogus", "unknown fix 'bogus'"),
    ],
)
def test_bad_impl_is_invalid_input_naming_the_flag(name, match):
    with pytest.raises(InvalidInputError, match=match):
        resolve_impl(name)


def test_cli_without_reference_data_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEMMA4_SHARED_DIR", str(tmp_path / "no-shared"))
    assert main(["parity", "--impl", "slime-pr2135", "--preset", "tiny-31b", "--seq-len", "4"]) == 2
    err = capsys.readouterr().err
    assert "reference data not available" in err and "slime-pr2135" in err


def test_report_without_reference_data_exits_2_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEMMA4_SHARED_DIR", str(tmp_path / "no-shared"))
    argv = [
        "report",
        "--impl",
        "slime-pr2135",
        "--preset",
        "tiny-31b",
        "--no-goldens",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    assert "reference data not available" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.html").exists()

"""Issue 15: weight sync into **SGLang 0.5.23's own** Gemma 4 model, executed on CPU.

SGLang's ``sglang.srt.models.gemma4_causal`` / ``gemma4_mm`` are imported where they are installed
(:mod:`harness.testing.sglang_cpu`: the real pure-Python dependencies installed ``--no-deps``, SGLang's own CPU
engine switch and gloo model-parallel groups), ``Gemma4ForCausalLM`` and ``Gemma4ForConditionalGeneration``
are built from each preset's config through SGLang's own config loader, and their real ``load_weights`` runs on
what our streaming converter (``convert_gemma4_to_hf``) emits from the Megatron state slime walks, at EP 1 and
as slime gathers it at EP 2 (global expert names). Every ``weight_loader`` call is recorded
(:func:`~harness.testing.sglang_cpu.run_load_weights`) and every parameter was NaN-filled before the load.
Checked: no emitted tensor is skipped by SGLang (its ``if name not in params_dict: continue``), no
(parameter, shard, expert) slot is written twice, and every SGLang parameter holds what the HF weights imply
(:func:`~harness.testing.sglang_cpu.expected_sglang_state`: ``[q; k; v]`` with V = K on K=V layers,
``[gate; up]``, ``w13 = experts.gate_up_proj``, ``w2 = experts.down_proj``, ``moe.per_expert_scale``,
``layer_scalar``). In E2B/E4B's KV-shared layers SGLang still builds the K/V rows of ``qkv_proj`` and a
``k_norm`` that HF does not have and SGLang never uses: those must stay unwritten (NaN).

Stubs (listed with the reason in :mod:`harness.testing.sglang_cpu`): ``sgl_kernel`` (compiled CUDA-kernel
package; its attributes raise if called, and the tests assert none was), ``torchvision`` (PyPI's wheel is a
CUDA build; stubbed only while SGLang's modules import). Nothing of SGLang is stubbed or copied.

Planted faults keep each check honest: the pre-fix per-expert fused names (``experts.{e}.gate_up_proj``) are
skipped by SGLang and leave ``w13`` unwritten; slime's rank-local expert index at EP 2 (the converter told
EP 1) writes expert slots twice and leaves half unwritten; a swapped gate/up gives wrong values.

When sglang or a package of its CPU import chain is missing, the tests skip with the install line
(:data:`~harness.testing.sglang_cpu.INSTALL_COMMAND`); with ``GEMMA4_REQUIRE_SHARED=1`` (CI) they fail instead.
"""

from __future__ import annotations

import re
import types

import pytest
import torch

from gemma4.conversion import streaming
from gemma4.errors import InvalidInputError
from harness.testing import sglang_cpu
from harness.testing.sglang_cpu import emit_for_sglang, load_into_sglang

pytestmark = pytest.mark.xdist_group("sglang-cpu")

PRESETS = ("tiny-31b", "tiny-26b-a4b", "tiny-12b", "tiny-e2b", "tiny-e4b")
LAYOUTS = ("causal", "conditional")
MOE = "tiny-26b-a4b"


@pytest.fixture(scope="module")
def sglang() -> dict[str, types.ModuleType]:
    return sglang_cpu.require_sglang()


def _load(preset: str, layout: str, emitted) -> list[str]:
    return load_into_sglang(preset, layout, emitted)[2]


CASES = [(p, layout, 1) for p in PRESETS for layout in LAYOUTS] + [(MOE, layout, 2) for layout in LAYOUTS]


@pytest.mark.parametrize("preset,layout,ep", CASES)
def test_sglang_loads_every_emitted_tensor_once_with_hf_values(sglang, preset, layout, ep):
    assert _load(preset, layout, emit_for_sglang(preset, layout, ep)) == []
    assert sglang["sgl_kernel"].called == []  # no stubbed CUDA kernel was reached


def test_planted_old_per_expert_fused_names_are_skipped_by_sglang(sglang, monkeypatch):
    """Planted: the pre-fix names ``experts.{e}.gate_up_proj`` / ``experts.{e}.down_proj``. SGLang's per-expert
    mapping wants ``experts.{e}.gate_proj.`` (trailing dot), its fused mapping ``experts.gate_up_proj``: it
    skips them silently, and ``w13`` / ``w2`` stay unwritten."""

    def old(name, param, spec, prefix, ep_size=1):
        out = real(name, param, spec, prefix, ep_size)
        m = re.match(r"^(.*\.experts\.\d+)\.(gate|up|down)_proj\.weight$", out[0][0]) if out else None
        if m is None:
            return out
        if m.group(2) == "down":
            return [(f"{m.group(1)}.down_proj", out[0][1])]
        return [(f"{m.group(1)}.gate_up_proj", torch.cat([out[0][1], out[1][1]]))]

    real = streaming.param_to_hf
    monkeypatch.setattr("gemma4.slime.weight_sync.param_to_hf", old)
    failures = _load(MOE, "causal", emit_for_sglang(MOE, "causal", 1))
    assert any(
        f.startswith("skipped by SGLang") and f.endswith("model.layers.0.experts.0.gate_up_proj")
        for f in failures
    ), failures
    assert any(f.startswith("wrong values: model.layers.0.moe.experts.w13_weight") for f in failures), (
        failures
    )


def test_planted_ep2_rank_local_expert_index_goes_red(sglang):
    """Planted: slime's rank-local SequentialMLP names at EP 2. Told EP 2, the converter refuses; told EP 1,
    SGLang gets every rank's expert ``i`` in slot ``i``: slots written twice, the upper half never."""
    with pytest.raises(InvalidInputError, match="rank-local"):
        emit_for_sglang(MOE, "causal", 2, global_names=False)
    failures = _load(MOE, "causal", emit_for_sglang(MOE, "causal", 2, global_names=False, ep_told=1))
    assert any(f.startswith("written twice: model.layers.0.moe.experts.w13_weight") for f in failures), (
        failures
    )
    assert any(f.startswith("wrong values: model.layers.0.moe.experts.w2_weight") for f in failures), failures


def test_planted_swapped_gate_up_gives_wrong_values(sglang):
    """Planted: a converter that emitted ``up`` as ``gate`` and back: every name lands once, the values are
    wrong -- the value check, not the routing checks, catches it."""
    emitted = [
        (n.replace("gate_proj", "@").replace("up_proj", "gate_proj").replace("@", "up_proj"), t)
        for n, t in emit_for_sglang("tiny-31b", "causal", 1)
    ]
    failures = _load("tiny-31b", "causal", emitted)
    assert failures and all(f.startswith("wrong values: ") and "mlp.gate_up_proj" in f for f in failures), (
        failures
    )


def test_planted_unknown_name_is_reported_as_skipped(sglang):
    """Planted: a name SGLang has no parameter for (``o_proj.weight`` -> ``o_proj.weights``): SGLang's default
    branch ``continue``s; the recorder reports it and the parameter stays NaN."""
    emitted = [
        (n + "s" if n.endswith("layers.0.self_attn.o_proj.weight") else n, t)
        for n, t in emit_for_sglang(MOE, "causal", 1)
    ]
    failures = _load(MOE, "causal", emitted)
    assert "skipped by SGLang (no weight_loader ran): model.layers.0.self_attn.o_proj.weights" in failures
    assert any(f.startswith("wrong values: model.layers.0.self_attn.o_proj.weight") for f in failures)


def test_missing_sglang_skips_with_the_install_line_and_fails_under_require_shared(monkeypatch):
    """The gate itself: SGLang not importable -> skip naming the install line; ``GEMMA4_REQUIRE_SHARED=1`` ->
    fail (a skip must not hide a missing SGLang in CI)."""

    def unavailable():
        raise sglang_cpu.SGLangUnavailable(f"no sglang here; {sglang_cpu.INSTALL_COMMAND}")

    monkeypatch.setattr(sglang_cpu, "import_sglang_gemma4", unavailable)
    monkeypatch.delenv("GEMMA4_REQUIRE_SHARED", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"pip install --no-deps sglang==0\.5\.23 triton=="):
        sglang_cpu.require_sglang()
    monkeypatch.setenv("GEMMA4_REQUIRE_SHARED", "1")
    with pytest.raises(pytest.fail.Exception, match="GEMMA4_REQUIRE_SHARED=1"):
        sglang_cpu.require_sglang()


def test_every_listed_package_is_imported_by_sglangs_gemma4_chain(sglang):
    """The install line (:data:`~harness.testing.sglang_cpu.CPU_PACKAGES`) lists nothing SGLang's Gemma 4
    import chain does not import (each listed distribution has a module in ``sys.modules``), and installs the
    pinned versions."""
    import importlib.metadata
    import sys

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    owners = importlib.metadata.packages_distributions()
    loaded = {norm(d) for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}
    pins = dict(p.split("==") for p in sglang_cpu.CPU_PACKAGES)
    assert sorted(n for n in pins if norm(n) not in loaded) == []
    assert {n: importlib.metadata.version(n) for n in pins} == pins

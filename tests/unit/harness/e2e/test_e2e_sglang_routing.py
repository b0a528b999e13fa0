"""``e2e-mini``'s rollout engine receives its weights only through SGLang 0.5.23's real name routing.

Every synced tensor goes into SGLang's own ``Gemma4ForCausalLM.load_weights`` (imported and run on CPU by
:mod:`harness.testing.sglang_cpu`; stubs: ``sgl_kernel`` and, during SGLang's import only, ``torchvision``),
and the engine gets SGLang's loaded parameters read back under HF names (:mod:`harness.e2e.sglang_route`).
A name SGLang skips, a slot it writes twice, a region it never writes: each makes the run red, naming it.

Planted (each goes red through the SGLang path, the message naming the tensor): the per-expert fused name
``experts.{e}.gate_up_proj`` the converter once emitted (SGLang skips it: ``w13`` stays unwritten), and EP
rank-local expert indices at EP 2 (experts 0..3 of both ranks land in slots 0..3 twice, 4..7 never).

Without SGLang (a clone where it is not installed) ``e2e-mini`` still runs, on the strict engine, and says
so; the tests that need SGLang skip via :func:`~harness.testing.sglang_cpu.require_sglang` (fail under
``GEMMA4_REQUIRE_SHARED=1``).
"""

from __future__ import annotations

import types

import pytest
import torch

import harness.e2e.sync as e2e_sync
from harness.e2e.run import E2EConfig, run_e2e
from harness.e2e.sglang_route import SGLANG_ROUTING, SGLangRouter
from harness.testing import sglang_cpu

pytestmark = pytest.mark.xdist_group("sglang-cpu")  # SGLang's import has process-wide side effects
MOE = "tiny-26b-a4b"


@pytest.fixture(scope="module")
def sglang() -> dict[str, types.ModuleType]:
    return sglang_cpu.require_sglang()


def _run(**kwargs):
    return run_e2e(E2EConfig(**({"steps": 1, "group_size": 4} | kwargs)))


def _errors(result, iteration: int = 0) -> list[str]:
    return result["steps"][iteration]["sync"]["errors"]


def _expected_hf(preset: str) -> dict[str, torch.Tensor]:
    """The preset's HF weights as the engine holds them: experts split per expert, as the router returns."""
    _, _, full, _ = sglang_cpu.preset_states(preset)
    out = {}
    for name, t in full.items():
        head = name.rsplit(".", 1)[0]
        if name.endswith(".experts.gate_up_proj"):
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{head}.{e}.gate_proj.weight"], out[f"{head}.{e}.up_proj.weight"] = gate, up
        elif name.endswith(".experts.down_proj"):
            out.update({f"{head}.{e}.down_proj.weight": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("preset", ["tiny-31b", MOE, "tiny-12b", "tiny-e2b", "tiny-e4b"])
def test_router_reads_back_exactly_what_the_converter_sent(sglang, preset):
    """The inverse of SGLang's packing: the converter's output through SGLang's ``load_weights`` and back
    gives every HF tensor of the preset, bit-equal, with no routing error (K=V, KV-shared, MoE layers)."""
    raw, _, full, _ = sglang_cpu.preset_states(preset)
    router = SGLangRouter(raw, torch.float32)
    router.bind({n: tuple(t.shape) for n, t in full.items()})
    router.begin()
    emitted = sglang_cpu.emit_for_sglang(preset, "causal", 1)
    router.load(emitted[: len(emitted) // 2])  # two buckets
    router.load(emitted[len(emitted) // 2 :])
    tensors, errors = router.finish()
    assert errors == []
    want = _expected_hf(preset)
    got = dict(tensors)
    assert sorted(got) == sorted(want)
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


def test_e2e_mini_routes_through_sglang_and_passes(sglang):
    result = _run(preset=MOE)
    assert result["pass"], result["failures"]
    assert result["weight_routing"] == SGLANG_ROUTING == "sglang-0.5.23"
    assert "weights routed by sglang-0.5.23" in result["layout"]["rollout_engine"]
    assert any(n.startswith("weight routing: sglang-0.5.23") for n in result["notes"])
    assert all(s["sync"]["num_errors"] == 0 and s["sync"]["buckets"] > 1 for s in result["steps"])
    assert sglang["sgl_kernel"].called == []


def test_planted_per_expert_fused_name_is_red_naming_it(sglang, plant_old_expert_names):
    """Planted: experts sent as ``experts.{e}.gate_up_proj`` / ``experts.{e}.down_proj`` (the converter's
    pre-fix names). SGLang's per-expert mapping wants ``experts.{e}.gate_proj.`` (trailing dot), its fused
    one ``experts.gate_up_proj``: it skips them, and the run names the skipped tensor and the unwritten
    ``w13`` region -- SGLang's verdict, not the strict engine's (which never sees these names)."""
    result = _run(preset=MOE)
    assert not result["pass"] and result["weight_routing"] == SGLANG_ROUTING
    text = "\n".join(result["failures"])
    assert (
        "SGLang 0.5.23: skipped by SGLang (no weight_loader ran): model.layers.0.experts.0.gate_up_proj"
        in text
    ), text
    sync = result["steps"][0]["sync"]
    assert sync["num_errors"] > 0 and not any("unknown tensor" in e for e in sync["errors"])
    assert "model.layers.0.experts.gate_up_proj[0].gate_proj" in sync["missing"]
    assert "iteration 0: train/rollout log-prob gap" in text


@pytest.mark.xdist_group("multiprocess")
def test_planted_ep_rank_local_expert_index_is_red_naming_it(sglang, monkeypatch):
    """Planted: at EP 2 every rank's experts sent under their rank-local index (slime's rule for non-TE
    names). SGLang's FusedMoE loader writes slots 0..3 twice and 4..7 never: the run names both."""
    from gemma4.slime.weight_sync import slime_global_expert_name

    monkeypatch.setattr(
        e2e_sync,
        "slime_global_expert_name",
        lambda name, ep_rank, ep, num_experts: slime_global_expert_name(name, 0, ep, num_experts),
    )
    result = _run(preset=MOE, ep=2, group_size=3)
    assert not result["pass"] and result["weight_routing"] == SGLANG_ROUTING
    text = "\n".join(result["failures"])
    assert "SGLang 0.5.23: written twice: model.layers.0.moe.experts.w13_weight shard=w1 expert=0" in text, (
        text
    )
    errors = "\n".join(_errors(result))
    assert (
        "by model.layers.0.experts.0.gate_proj.weight and model.layers.0.experts.0.gate_proj.weight" in errors
    )
    assert "model.layers.0.experts.gate_up_proj[4].gate_proj" in result["steps"][0]["sync"]["missing"]
    assert "never received" in text and "iteration 0: train/rollout log-prob gap" in text


def test_without_sglang_e2e_mini_runs_on_the_strict_engine_and_says_so(monkeypatch):
    """A clone without SGLang: the run passes on the strict engine and names that routing and the reason."""

    def unavailable():
        raise sglang_cpu.SGLangUnavailable(f"no sglang here; {sglang_cpu.INSTALL_COMMAND}")

    monkeypatch.setattr(sglang_cpu, "import_sglang_gemma4", unavailable)
    result = _run(group_size=2)
    assert result["pass"], result["failures"]
    routing = result["weight_routing"]
    assert routing.startswith("strict engine (SGLang not importable: no sglang here; python -m pip install")
    assert "weights routed by strict engine" in result["layout"]["rollout_engine"]
    assert result["notes"][0] == f"weight routing: {routing}"

"""Weight sync lands in SGLang 0.5.23's Gemma 4 name routing: every name our converter emits is routed by
**SGLang's own** ``load_weights`` to the parameter, shard and expert its HF meaning says (tiny-26b-a4b MoE at
EP 1 and as slime gathers it at EP 2, tiny-31b, tiny-e2b; both layouts), and the installed SGLang is the pinned
one whose line numbers the other SGLang tests cite.

SGLang's ``Gemma4ForCausalLM`` / ``Gemma4ForConditionalGeneration`` are imported and built on CPU by
:mod:`harness.testing.sglang_cpu` (real dependencies installed ``--no-deps``; stubs: ``sgl_kernel``, a compiled
CUDA-kernel package whose attributes raise if called, and ``torchvision``, whose PyPI wheel is a CUDA build,
only while SGLang imports; the reasons are in that module's docstring). Its ``load_weights`` runs as written;
each ``weight_loader`` call is recorded as ``(emitted name, parameter, shard, expert)``: that includes
``FusedMoE.make_expert_params_mapping`` (``layers/moe/fused_moe_triton/layer.py``), the stacked q/k/v and
gate/up mappings with the K=V duplication, and the default loader. Nothing of SGLang is copied here: the
expected route of each name (:func:`expected_route`) is stated from the HF name's meaning. The values, the
matrix of presets and layouts and the planted faults are in ``test_sglang_real_load.py``.

When sglang or a package of its CPU import chain is missing, the routing tests skip with the install line
(``GEMMA4_REQUIRE_SHARED=1``: fail).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest

from harness.testing import sglang_cpu
from harness.testing.sglang_cpu import emit_for_sglang, load_into_sglang, preset_states

pytestmark = pytest.mark.xdist_group("sglang-cpu")

SGLANG_VERSION = sglang_cpu.SGLANG_VERSION

#: sha256 of ``Gemma4ForCausalLM.load_weights``'s source in sglang 0.5.23 (models/gemma4_causal.py:1258-1451):
#: docstrings of the SGLang tests cite its lines; a different installed SGLang fails the pin, not silently.
LOAD_WEIGHTS_SHA256 = "bf76ee1b80efdd3e64562a80993443044dc8460d0dede59923f9179687d45cf9"

_EXPERT = re.compile(r"^(?P<head>.*\.layers\.\d+)\.experts\.(?P<e>\d+)\.(?P<w>gate|up|down)_proj\.weight$")
_ATTN = re.compile(r"^(?P<head>.*\.self_attn)\.(?P<w>[qkv])_proj\.weight$")
_MLP = re.compile(r"^(?P<head>.*\.mlp)\.(?P<w>gate|up)_proj\.weight$")
_LAYER = re.compile(r"layers\.(\d+)\.")


def expected_route(name: str, text_config: Any, layout: str) -> list[tuple[str, Any, Any]]:
    """``(SGLang parameter, shard, expert)`` an emitted HF name must be written to, from its HF meaning:
    expert ``e``'s gate / up / down -> ``moe.experts.w13_weight`` shard ``w1`` / ``w3`` or ``w2_weight``
    shard ``w2``, expert ``e``; q / k / v -> ``qkv_proj`` shard ``q`` / ``k`` / ``v`` (k also as ``v`` on a K=V
    layer); dense gate / up -> ``gate_up_proj`` shard 0 / 1; ``router.per_expert_scale`` ->
    ``moe.per_expert_scale``; everything else its own name."""
    name = sglang_cpu.PARAM_PREFIX[layout] + name[len(sglang_cpu.EMIT_PREFIX[layout]) :]
    m = _EXPERT.match(name)
    if m:
        param = "w2_weight" if m["w"] == "down" else "w13_weight"
        shard = {"gate": "w1", "up": "w3", "down": "w2"}[m["w"]]
        return [(f"{m['head']}.moe.experts.{param}", shard, int(m["e"]))]
    m = _ATTN.match(name)
    if m:
        route = [(f"{m['head']}.qkv_proj.weight", m["w"], None)]
        layer = int(_LAYER.search(name).group(1))
        if m["w"] == "k" and layer in sglang_cpu.k_eq_v_layers(text_config):
            route.append((f"{m['head']}.qkv_proj.weight", "v", None))
        return route
    m = _MLP.match(name)
    if m:
        return [(f"{m['head']}.gate_up_proj.weight", 0 if m["w"] == "gate" else 1, None)]
    return [(name.replace(".router.per_expert_scale", ".moe.per_expert_scale"), None, None)]


def route_failures(record: sglang_cpu.LoadRecord, emitted_names: list[str], text_config: Any, layout: str):
    """Each emitted name's recorded ``weight_loader`` calls against :func:`expected_route` (and skips)."""
    got: dict[str, list[tuple[str, Any, Any]]] = {}
    for emitted, param, shard, expert in record.calls:
        got.setdefault(emitted, []).append((param, shard, expert))
    failures = [f"skipped by SGLang: {n}" for n in record.skipped]
    for name in emitted_names:
        want = expected_route(name, text_config, layout)
        if name in got and got[name] != want:
            failures.append(f"misrouted: {name} -> {got[name]}, expected {want}")
    return failures


@pytest.fixture(scope="module")
def sglang():
    return sglang_cpu.require_sglang()


@pytest.mark.parametrize(
    "preset,layout,ep",
    [
        ("tiny-26b-a4b", "causal", 1),
        ("tiny-26b-a4b", "causal", 2),
        ("tiny-26b-a4b", "conditional", 2),
        ("tiny-31b", "causal", 1),
        ("tiny-e2b", "conditional", 1),
    ],
)
def test_every_emitted_name_routes_to_its_sglang_slot(sglang, preset, layout, ep):
    emitted = emit_for_sglang(preset, layout, ep)
    _, record, failures = load_into_sglang(preset, layout, emitted)
    cfg = preset_states(preset)[1]
    assert route_failures(record, [n for n, _ in emitted], cfg, layout) == []
    assert failures == []


def test_route_check_goes_red_on_a_misroute(sglang, monkeypatch):
    """Planted on SGLang's side (as a changed SGLang would): ``make_expert_params_mapping`` with the gate and
    up shards swapped. Every name still lands once; the route check names the misrouted gate."""
    fused_moe = sglang["fused_moe"].FusedMoE
    real = fused_moe.make_expert_params_mapping

    def swapped(cls, **kwargs):
        flip = {"w1": "w3", "w3": "w1"}
        return [(p, w, e, flip.get(s, s)) for p, w, e, s in real(**kwargs)]

    monkeypatch.setattr(fused_moe, "make_expert_params_mapping", classmethod(swapped))
    emitted = emit_for_sglang("tiny-26b-a4b", "causal", 1)
    _, record, _ = load_into_sglang("tiny-26b-a4b", "causal", emitted)
    cfg = preset_states("tiny-26b-a4b")[1]
    failures = route_failures(record, [n for n, _ in emitted], cfg, "causal")
    assert any(f.startswith("misrouted: model.layers.0.experts.0.gate_proj.weight") for f in failures), (
        failures
    )


def _installed_sglang_file(relative: str) -> Path:
    """A source file of the installed sglang (found without importing it); without sglang, skips with the
    install line (fails under ``GEMMA4_REQUIRE_SHARED=1``)."""
    from importlib.util import find_spec

    spec = find_spec("sglang")
    if spec is None or spec.origin is None:
        sglang_cpu.require_sglang()  # skips with the install line (fails under GEMMA4_REQUIRE_SHARED=1)
    assert importlib.metadata.version("sglang") == SGLANG_VERSION
    return Path(spec.origin).parent / relative


def test_installed_sglang_is_the_pinned_one():
    """The installed SGLang is 0.5.23 and its ``Gemma4ForCausalLM.load_weights`` is byte-for-byte the one the
    SGLang tests' docstrings cite by line."""
    causal = _installed_sglang_file("srt/models/gemma4_causal.py")
    source = causal.read_text()
    model = next(
        n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Gemma4ForCausalLM"
    )
    load = next(n for n in model.body if isinstance(n, ast.FunctionDef) and n.name == "load_weights")
    digest = hashlib.sha256(ast.get_source_segment(source, load).encode()).hexdigest()
    assert (load.lineno, digest) == (1258, LOAD_WEIGHTS_SHA256), (
        f"{causal}:{load.lineno}: load_weights changed; re-check the cited lines"
    )

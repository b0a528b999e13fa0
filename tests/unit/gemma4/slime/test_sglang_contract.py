"""Weight sync lands in SGLang 0.5.23's Gemma 4 name routing: every tensor our converter emits is loaded, into
the right slot, with the right values, exactly once (tiny-26b-a4b MoE and tiny-31b; EP 1 and EP 2 as slime
gathers it).

**This is an extraction, not SGLang's own code executing.** ``sglang==0.5.23`` installs without deps, but
importing ``sglang.srt.models.gemma4_causal`` pulls the whole server stack at package import
(``sglang/__init__`` -> ``srt.utils.common`` -> ``srt.platforms.cpu``): after stubbing ``orjson``,
``pybase64``, ``requests``, ``triton``, ``starlette`` and ``msgspec`` it fails inside
``CpuSRTPlatform`` (class body, ``platforms/cpu.py:119``) on a triton-decorated call; building the model
would further need SGLang's distributed/TP groups, server args and the CUDA-kernel modules
(``sglang.kernels.ops.*``). Within this task's time box that was not reached, so :func:`sglang_route` below is
the smallest faithful extraction of ``Gemma4ForCausalLM.load_weights`` of SGLang **0.5.23**
(``sglang/srt/models/gemma4_causal.py`` lines 1258-1420: the ``model.language_model.`` rewrite (1306), the
``router.per_expert_scale`` / ``.experts.`` -> ``.moe.experts.`` rewrites (1312-1316), the per-expert loop
over ``FusedMoE.make_expert_params_mapping`` (``layers/moe/fused_moe_triton/layer.py`` lines 1797-1822,
copied: ``experts.{e}.{gate,down,up}_proj.`` -> ``experts.w13_`` / ``experts.w2_`` with shard ``w1`` /
``w2`` / ``w3``) (1354-1374), the fused-checkpoint loop (1376-1393), the stacked q/k/v and dense gate/up
loop with the K=V duplication (1394-1408) and the default loader (1409-1420), each ``if name not in
params_dict: continue`` kept: a skipped name is recorded, not raised). ``pp_filter_load_weight`` is a no-op
at PP 1 and is left out. The parameter set (``params_dict``) is derived from HF's state-dict names by
SGLang's module layout (``qkv_proj``, ``mlp.gate_up_proj``, ``moe.experts.w13_weight`` [E, 2I, H] =
``[w1; w3]``, ``moe.experts.w2_weight``, ``moe.per_expert_scale``; everything else keeps HF's name).
Weight loaders are recorded, then applied as FusedMoE / QKV / MergedColumn loaders write (shard ``w1`` rows
``:I``, ``w3`` rows ``I:`` of expert ``e``; ``q``/``k``/``v`` and ``0``/``1`` by row blocks).

If ``sglang`` is importable, the test also checks ``make_expert_params_mapping`` there equals the copy.
Stubs: none (nothing of SGLang is imported by the routing itself).
"""

from __future__ import annotations

import re
import types

import pytest
import torch

from gemma4.config import hf_text_config_from_any
from gemma4.conversion import streaming
from gemma4.errors import InvalidInputError
from gemma4.slime.weight_sync import convert_gemma4_to_hf, slime_global_expert_name
from harness.presets import preset_config_dict
from harness.reference import build_reference_model, hf_text_state_dict
from harness.testing.conversion import megatron_state_from_hf

SGLANG_VERSION = "0.5.23"


def make_expert_params_mapping(gate: str, down: str, up: str, num_experts: int):
    """``FusedMoE.make_expert_params_mapping`` of SGLang 0.5.23 (layer.py 1797-1822), copied."""
    return [
        ("experts.w13_" if w in (gate, up) else "experts.w2_", f"experts.{e}.{w}.", e, shard)
        for e in range(num_experts)
        for shard, w in [("w1", gate), ("w2", down), ("w3", up)]
    ]


def sglang_route(weights, params_dict, num_experts: int, k_eq_v_layers: set[int]):
    """``Gemma4ForCausalLM.load_weights`` routing (0.5.23, lines 1258-1420). Returns ``(calls, skipped)``:
    ``calls`` = ``(param_name, shard_id, expert_id, tensor)`` per weight_loader call; ``skipped`` = names
    dropped by an ``if name not in params_dict: continue``."""
    stacked = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    fused = [
        ("experts.w13_weight", "experts.gate_up_proj", ("w1", "w3")),
        ("experts.w2_weight", "experts.down_proj", ("w2",)),
    ]
    per_expert = (
        make_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts) if num_experts else []
    )
    calls, skipped = [], []
    for name, w in weights:
        name = name.replace("model.language_model.", "model.")
        name = name.replace(".router.per_expert_scale", ".moe.per_expert_scale")
        if ".experts." in name and ".moe.experts." not in name:
            name = name.replace(".experts.", ".moe.experts.")
        m = re.search(r"layers\.(\d+)\.", name)
        dup_k_to_v = (
            ".k_proj." in name and bool(k_eq_v_layers) and m is not None and int(m.group(1)) in k_eq_v_layers
        )
        orig = name
        for param_name, weight_name, expert_id, shard_id in per_expert:
            if weight_name not in orig:
                continue
            name = orig.replace(weight_name, param_name)
            if name not in params_dict:
                continue
            calls.append((name, shard_id, expert_id, w))
            break
        else:
            for param_name, weight_name, shard_ids in fused:
                name = orig
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                if name not in params_dict:
                    continue
                for i in range(num_experts):
                    for chunk, sid in zip(w[i].chunk(len(shard_ids), dim=0), shard_ids):
                        calls.append((name, sid, i, chunk))
                break
            else:
                for param_name, weight_name, shard_id in stacked:
                    name = orig
                    if weight_name not in name:
                        continue
                    name = name.replace(weight_name, param_name)
                    if name not in params_dict:
                        continue
                    calls.append((name, shard_id, None, w))
                    if dup_k_to_v:
                        calls.append((name, "v", None, w))
                    break
                else:
                    name = orig
                    if name.endswith(".bias") and name not in params_dict:
                        continue
                    if name not in params_dict:
                        skipped.append(orig)
                        continue
                    calls.append((name, None, None, w))
    return calls, skipped


def sglang_params(hf_full: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """SGLang's parameters (names and values) that hold ``hf_full`` (absolute ``model.`` names): the oracle."""
    out: dict[str, torch.Tensor] = {}
    k_eq_v = _k_eq_v_layers(cfg)
    for name, t in hf_full.items():
        m = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.weight$", name)
        if m:
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            out.setdefault(f"{m.group(1)}.self_attn.qkv_proj.weight", {})[m.group(2)] = t
            if m.group(2) == "k" and layer in k_eq_v:
                out[f"{m.group(1)}.self_attn.qkv_proj.weight"]["v"] = t
            continue
        m = re.match(r"^(.*)\.mlp\.(gate|up)_proj\.weight$", name)
        if m:
            out.setdefault(f"{m.group(1)}.mlp.gate_up_proj.weight", {})[0 if m.group(2) == "gate" else 1] = t
            continue
        if name.endswith("experts.gate_up_proj"):
            head = name[: -len("experts.gate_up_proj")]
            i = t.shape[1] // 2
            out[head + "moe.experts.w13_weight"] = {
                (s, e): t[e, :i] if s == "w1" else t[e, i:] for e in range(t.shape[0]) for s in ("w1", "w3")
            }
            continue
        if name.endswith("experts.down_proj"):
            out[name[: -len("experts.down_proj")] + "moe.experts.w2_weight"] = {
                ("w2", e): t[e] for e in range(t.shape[0])
            }
            continue
        out[name.replace(".router.per_expert_scale", ".moe.per_expert_scale")] = {None: t}
    return out


def _k_eq_v_layers(cfg) -> set[int]:
    if not getattr(cfg, "attention_k_eq_v", False):
        return set()
    return {i for i, lt in enumerate(cfg.layer_types) if lt == "full_attention"}


def _slots(calls):
    """Each call's slot key within its param: shard (and expert for MoE)."""
    for pname, shard, expert, t in calls:
        yield pname, (shard if expert is None else (shard, expert)), t


def route_failures(emitted, cfg, hf_full) -> list[str]:
    """Run the routing on ``emitted``: no skipped name, no slot written twice, every slot written, values equal."""
    want = sglang_params(hf_full, cfg)
    calls, skipped = sglang_route(
        emitted, want, int(getattr(cfg, "num_experts", 0) or 0), _k_eq_v_layers(cfg)
    )
    failures = [f"skipped by SGLang (not in params_dict): {n}" for n in skipped]
    got: dict[tuple[str, object], torch.Tensor] = {}
    for pname, slot, t in _slots(calls):
        if (pname, slot) in got:
            failures.append(f"written twice: {pname} {slot}")
        elif slot not in want[pname]:
            failures.append(f"no such slot: {pname} {slot}")
        got[(pname, slot)] = t
    for pname, slots in want.items():
        for slot, t in slots.items():
            g = got.get((pname, slot))
            if g is None:
                failures.append(f"never written: {pname} {slot}")
            elif tuple(g.shape) != tuple(t.shape) or not torch.equal(g, t):
                failures.append(f"wrong values: {pname} {slot}")
    return failures


# ---- what slime hands the converter ----------------------------------------------------------------------


def _setup(preset: str):
    raw = preset_config_dict(preset)
    cfg = hf_text_config_from_any(raw)
    rel = hf_text_state_dict(build_reference_model(cfg, torch.float32, seed=3))
    full = {(k if k == "lm_head.weight" else "model." + k): v for k, v in rel.items()}
    if cfg.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    model = megatron_state_from_hf(cfg, rel, torch.float32)
    return raw, cfg, full, model


_LOCAL = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def slime_names(model, num_experts: int, ep: int, *, global_names: bool):
    """``(name, full tensor)`` as slime's converter receives them at EP ``ep`` (TP 1): Megatron names with
    ``module.module.``; an expert ``g`` lives on EP rank ``g // (E/ep)`` as ``local_experts.{g % (E/ep)}``;
    slime keeps that local name (``update_weight/common.py:232``) unless :func:`with_global_expert_names`
    renames it (``global_names``); EP ranks' lists are converted one after another
    (``update_weight_from_distributed.py:238``)."""
    per_rank = num_experts // ep if num_experts else 0
    plain, experts = [], [[] for _ in range(ep)]
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state") or name.endswith("layer_scalar"):
            continue  # slime walks parameters and expert_bias only (common.py:235-252); layer_scalar is fixed
        m = _LOCAL.search(name)
        if m is None:
            plain.append(("module.module." + name, t))
            continue
        g = int(m.group(1))
        r, i = divmod(g, per_rank)
        local = "module.module." + _LOCAL.sub(f".mlp.experts.local_experts.{i}.", name)
        experts[r].append((slime_global_expert_name(local, r, ep, num_experts) if global_names else local, t))
    return plain + [p for rank in experts for p in rank]


def _emit(raw, named, ep: int):
    args = types.SimpleNamespace(hf_config=raw, expert_model_parallel_size=ep)
    return [pair for n, t in named for pair in convert_gemma4_to_hf(args, n, t)]


def _layer_scalars(full):
    return {k: v for k, v in full.items() if k.endswith("layer_scalar")}


@pytest.mark.parametrize("preset,ep", [("tiny-26b-a4b", 1), ("tiny-26b-a4b", 2), ("tiny-31b", 1)])
def test_every_emitted_tensor_lands_in_sglang(preset, ep):
    raw, cfg, full, model = _setup(preset)
    experts = int(getattr(cfg, "num_experts", 0) or 0) if getattr(cfg, "enable_moe_block", False) else 0
    emitted = _emit(raw, slime_names(model, experts, ep, global_names=True), ep)
    # layer_scalar is a buffer slime does not walk; it is compared from the export, not weight sync
    emitted += list(_layer_scalars(full).items())
    assert route_failures(emitted, cfg, full) == []


def test_old_fused_per_expert_names_are_skipped_by_sglang(monkeypatch):
    """Planted: the pre-fix names ``experts.{e}.gate_up_proj`` / ``experts.{e}.down_proj`` go red."""
    raw, cfg, full, model = _setup("tiny-26b-a4b")

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
    emitted = _emit(raw, slime_names(model, cfg.num_experts, 1, global_names=True), 1)
    emitted += list(_layer_scalars(full).items())
    failures = route_failures(emitted, cfg, full)
    assert any(f.startswith("skipped by SGLang") and f.endswith("experts.0.gate_up_proj") for f in failures)
    assert any("never written: model.layers.0.moe.experts.w13_weight" in f for f in failures)


def test_ep2_rank_local_index_goes_red():
    """Planted: slime's rank-local SequentialMLP names at EP 2. With EP known, the converter refuses; if the
    EP size were not passed, SGLang would get every rank's expert i in slot i (written twice, half never)."""
    raw, cfg, full, model = _setup("tiny-26b-a4b")
    local = slime_names(model, cfg.num_experts, 2, global_names=False)
    with pytest.raises(InvalidInputError, match="rank-local"):
        _emit(raw, local, 2)
    emitted = _emit(raw, local, 1) + list(_layer_scalars(full).items())
    failures = route_failures(emitted, cfg, full)
    assert any(f.startswith("written twice: model.layers.0.moe.experts.w13_weight") for f in failures)
    assert any(f.startswith("never written: model.layers.0.moe.experts.w2_weight") for f in failures)


#: sha256 of ``Gemma4ForCausalLM.load_weights``'s source in sglang 0.5.23 (models/gemma4_causal.py:1258-1451),
#: the function the routing above is extracted from: a different installed SGLang fails the pin, not silently.
LOAD_WEIGHTS_SHA256 = "bf76ee1b80efdd3e64562a80993443044dc8460d0dede59923f9179687d45cf9"


def _installed_sglang_file(relative: str):
    """A source file of the installed sglang, found without importing it (its package import pulls the GPU
    server stack); skips with a reason when sglang 0.5.23 is not installed (``tox -e unit`` installs it)."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        pytest.skip(
            f"sglang=={SGLANG_VERSION} is not installed (pip install --no-deps sglang=={SGLANG_VERSION})"
        )
    assert importlib.metadata.version("sglang") == SGLANG_VERSION
    return Path(spec.origin).parent / relative


def test_extracted_routing_is_installed_sglangs():
    """The installed SGLang 0.5.23's own ``FusedMoE.make_expert_params_mapping`` (run from its source file, as
    written) equals the copy above, and its ``Gemma4ForCausalLM.load_weights`` is byte-for-byte the function
    the routing was extracted from."""
    import ast
    import hashlib

    layer = _installed_sglang_file("srt/layers/moe/fused_moe_triton/layer.py")
    tree = ast.parse(layer.read_text(), str(layer))
    fused = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FusedMoE")
    fn = next(
        n for n in fused.body if isinstance(n, ast.FunctionDef) and n.name == "make_expert_params_mapping"
    )
    fn.decorator_list = []  # a classmethod; ``cls`` is unused
    ns: dict = {"List": list, "Tuple": tuple}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(layer), "exec"), ns)  # noqa: S102
    theirs = ns["make_expert_params_mapping"](None, "gate_proj", "down_proj", "up_proj", 4)
    assert theirs == make_expert_params_mapping("gate_proj", "down_proj", "up_proj", 4)

    causal = _installed_sglang_file("srt/models/gemma4_causal.py")
    source = causal.read_text()
    model = next(
        n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Gemma4ForCausalLM"
    )
    load = next(n for n in model.body if isinstance(n, ast.FunctionDef) and n.name == "load_weights")
    digest = hashlib.sha256(ast.get_source_segment(source, load).encode()).hexdigest()
    assert digest == LOAD_WEIGHTS_SHA256, (
        f"{causal}:{load.lineno}: load_weights changed; re-extract the routing in this test"
    )

"""Family ``router``: HF's MoE router decisions per MoE layer, on the forward family's fixed inputs.

Recorded, for every layer with ``enable_moe_block``, from ``Gemma4TextRouter`` of the seeded reference (the
exact-fp64 router for fp64, stock HF for fp32) on seeded ids (``input_ids``, ``batch`` x ``seq_len``, tokens
flattened batch-major as HF does, ``T = batch * seq_len``):

* ``layer.{i}.router_input`` ``[T, H]``: the residual stream fed to the router (a forward pre-hook);
* ``layer.{i}.probs`` ``[T, E]``: the softmax over all experts;
* ``layer.{i}.top_k_weights`` ``[T, k]``: renormalised over the k, times ``per_expert_scale``;
* ``layer.{i}.top_k_index`` ``[T, k]`` (int64): the chosen experts, in ``torch.topk`` order.

Checked against HF now (rebuilt from the recorded config and seed, on the recorded ids) and against OUR
router: the ``mlp.router`` (:class:`gemma4.model.moe.Gemma4Router`) of our Megatron model built with
``build_gemma4_model`` and loaded with ``load_hf_into_mcore``, fed the *recorded* router inputs. Why those
inputs and not the ones our model computes itself: exact index equality is only well posed on identical
inputs. Our own residual stream differs from HF's by rounding (fp32 ~1e-6), which may legitimately flip a
near tie, and an error upstream of the router is the ``forward`` family's to localise. What our model
feeds its router is still checked: a pre-hook on each of our routers captures its input during a full
forward of our model, judged against the recorded input like any activation. So the family catches a
wrong router formula, a wrong router weight mapping and a router fed the wrong tensor, each by name.

Bounds: indices exactly (order included); router inputs, probabilities and weights with the dtype's
activation bound (``tolerance_for(dtype).activations_max_scaled``, scaled as ``max|d| / max(1, max|ref|)``).
Recording refuses a golden whose decisions are ill-conditioned: the smallest gap between consecutive sorted
probabilities among the first ``k + 1`` of any token (``min_topk_margin``) must exceed twice the bound,
so no error within the bound can flip an index, and an index that flips is a real change.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.goldens import registry
from harness.goldens.outcome import PASS, REGRESSION, Outcome, classify
from harness.goldens.registry import Case, Recording
from harness.goldens.store import GoldenError, file_with_suffix, load_safetensors, safetensors_metadata
from harness.tolerances import tolerance_for

NAME = "router"
DESCRIPTION = "MoE router decisions per MoE layer: router input, probabilities, top-k indices and weights"
SUFFIX = ".safetensors"
KINDS = ("router_input", "probs", "top_k_weights", "top_k_index")


def cases() -> list[Case]:
    """Every golden preset with MoE layers (``enable_moe_block``), in each golden dtype."""
    from harness.presets import preset_config_dict

    moe = [p for p in registry.GOLDEN_PRESETS if preset_config_dict(p).get("enable_moe_block")]
    return [Case(NAME, p, d) for p in moe for d in registry.GOLDEN_DTYPES]


def _names(layers: list[int]) -> list[str]:
    return [f"layer.{i}.{kind}" for i in layers for kind in KINDS]


def _dtype(name: str) -> torch.dtype:
    from harness.parity import DTYPES

    return DTYPES[name]


# ---- computing -------------------------------------------------------------------------------------------


@contextmanager
def _capture_routers(
    routers: dict[int, torch.nn.Module], store: dict[str, torch.Tensor], outputs: bool, seq_first: bool
):
    """Pre-hook: each router's input as ``[T, H]`` in HF's batch-major token order (``seq_first``: the
    input is Megatron's ``[s, b, H]``); with ``outputs`` also its (probs, top-k weights, top-k index), which
    HF's router returns from ``forward``."""

    def put_input(i):
        def hook(module, args):
            x = args[0].detach()
            if seq_first:
                x = x.transpose(0, 1)
            store[f"layer.{i}.router_input"] = x.reshape(-1, x.shape[-1]).clone()

        return hook

    def put_outputs(i):
        def hook(module, args, out):
            for kind, t in zip(KINDS[1:], out, strict=True):
                store[f"layer.{i}.{kind}"] = t.detach().clone()

        return hook

    hooks = [r.register_forward_pre_hook(put_input(i)) for i, r in routers.items()]
    if outputs:
        hooks += [r.register_forward_hook(put_outputs(i)) for i, r in routers.items()]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def run_hf(
    config: dict[str, Any], dtype: torch.dtype, seed: int, ids: torch.Tensor | None = None
) -> tuple[torch.nn.Module, Any, torch.Tensor, list[int], dict[str, torch.Tensor]]:
    """Build the seeded HF reference and run it; returns (model, spec, ids, MoE layers, decisions)."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from harness.parity import make_inputs
    from harness.presets import DEFAULT_BATCH, DEFAULT_SEQ_LEN
    from harness.reference import build_reference_model

    cfg = hf_text_config_from_any(config)
    spec = text_spec_from_hf(cfg)
    hf = build_reference_model(cfg, dtype, seed=seed)
    routers = {i: layer.router for i, layer in enumerate(hf.model.layers) if layer.enable_moe_block}
    if not routers:
        raise GoldenError(f"the config has no MoE layers (enable_moe_block is {cfg.enable_moe_block})")
    if ids is None:
        ids = make_inputs(spec, DEFAULT_BATCH, DEFAULT_SEQ_LEN, seed)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _capture_routers(routers, out, outputs=True, seq_first=False):
        hf(input_ids=ids, use_cache=False)
    return hf, spec, ids, sorted(routers), out


def build_ours(hf: torch.nn.Module, spec: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Our Megatron model with the HF model's weights (the conversion mapping under test too)."""
    from gemma4.conversion.mapping import load_hf_into_mcore
    from gemma4.model.build import build_gemma4_model
    from harness.reference import hf_text_state_dict

    ours = build_gemma4_model(spec, dtype)
    load_hf_into_mcore(ours, hf_text_state_dict(hf), spec)
    return ours.eval()


def _our_routers(ours: torch.nn.Module, layers: list[int]) -> dict[int, torch.nn.Module]:
    routers = {}
    for i in layers:
        router = getattr(ours.decoder.layers[i].mlp, "router", None)
        if router is None:
            raise RuntimeError(f"our layer {i} has no mlp.router, but HF routes on layer {i}")
        routers[i] = router
    return routers


def our_router_inputs(ours: torch.nn.Module, layers: list[int], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What our model feeds each router during a full forward on ``ids`` (``layer.{i}.router_input``)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _capture_routers(_our_routers(ours, layers), out, outputs=False, seq_first=True):
        ours(ids)
    return out


def our_decisions(
    ours: torch.nn.Module, layers: list[int], inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Our routers' ``route`` on the given router inputs (probs, top-k weights, top-k index per layer)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, router in _our_routers(ours, layers).items():
            decided = router.route(inputs[f"layer.{i}.router_input"])
            for kind, t in zip(KINDS[1:], decided, strict=True):
                out[f"layer.{i}.{kind}"] = t.detach()
    return out


def topk_margins(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the smallest gap between consecutive sorted probabilities among the first ``k + 1``: how
    far the decision is from a tie (in the top-k set, or in the order within it)."""
    s = probs.to(torch.float64).sort(dim=-1, descending=True).values[:, : k + 1]
    return (s[:, :-1] - s[:, 1:]).min(dim=-1).values


# ---- judging ---------------------------------------------------------------------------------------------


@dataclass
class Judgement:
    """One side's decisions against a reference: exact indices, bounded values, the first problem."""

    index_mismatches: int = 0
    tokens: int = 0
    first_bad: str | None = None
    worst: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in KINDS if k != "top_k_index"})

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    @property
    def values_max(self) -> float:
        """The worst scaled error of probabilities and weights (the number the report shows)."""
        return max(self.worst["probs"], self.worst["top_k_weights"])

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "first_bad": self.first_bad,
            "index_mismatches": self.index_mismatches,
            "tokens": self.tokens,
            "worst_scaled": self.worst,
        }


def _token(t: int, seq_len: int) -> str:
    b, s = divmod(t, seq_len)
    return f"token {t} (batch {b}, position {s})"


def judge(
    now: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    layers: list[int],
    bound: float,
    seq_len: int,
    kinds: tuple[str, ...] = KINDS,
    margins: dict[int, torch.Tensor] | None = None,
) -> Judgement:
    """Compare ``now`` with ``ref`` layer by layer (forward order); indices exactly, the rest scaled."""
    from harness.compare import tensor_diff

    j = Judgement()
    for i in layers:
        for kind in kinds:
            name = f"layer.{i}.{kind}"
            a, b = now[name], ref[name]
            if a.shape != b.shape:
                j.first_bad = j.first_bad or (
                    f"layer {i} {kind}: shape {tuple(a.shape)} vs golden {tuple(b.shape)}"
                )
                continue
            if kind == "top_k_index":
                rows = (a != b).any(dim=-1)
                j.tokens += int(rows.numel())
                j.index_mismatches += int(rows.sum())
                if j.first_bad is None and bool(rows.any()):
                    t = int(rows.nonzero()[0])
                    margin = "" if margins is None else f"; golden top-k margin {float(margins[i][t]):.1e}"
                    j.first_bad = (
                        f"layer {i} {_token(t, seq_len)}: experts {a[t].tolist()} vs golden {b[t].tolist()}"
                        f"{margin}"
                    )
                continue
            d = tensor_diff(a, b)
            j.worst[kind] = max(j.worst[kind], d.scaled)
            if j.first_bad is None and not d.scaled <= bound:
                where = _token(d.argmax_pos[0], seq_len) if d.argmax_pos else "?"
                what = "router input" if kind == "router_input" else kind
                j.first_bad = f"layer {i} {what} at {where} (scaled error {d.scaled:.2e} > {bound:.0e})"
    return j


# ---- record / check --------------------------------------------------------------------------------------


def record(case: Case) -> Recording:
    """Run HF on the preset and keep every MoE layer's router input and decisions."""
    from safetensors.torch import save

    from gemma4.errors import InvalidInputError
    from harness.presets import preset_config_dict

    config = preset_config_dict(case.preset)
    dtype = _dtype(case.dtype)
    _, spec, ids, layers, decisions = run_hf(config, dtype, case.seed)
    tol = tolerance_for(dtype)
    margins = {
        i: float(topk_margins(decisions[f"layer.{i}.probs"], spec.top_k_experts).min()) for i in layers
    }
    worst = min(margins, key=margins.get)
    if not margins[worst] > 2 * tol.activations_max_scaled:
        raise InvalidInputError(
            f"{case.name}: router decisions are ill-conditioned: layer {worst} has a top-k margin of "
            f"{margins[worst]:.1e}, not above twice the {tol.name} bound {tol.activations_max_scaled:.0e}, so "
            "an error within the bound could flip an index; choose another preset or seed"
        )
    tensors = {"input_ids": ids, **{n: decisions[n] for n in _names(layers)}}
    data = save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata=safetensors_metadata(case.name, NAME)
    )
    return Recording(
        files={SUFFIX: data},
        fields={
            "inputs": {
                "kind": "seeded random token ids (harness.parity.make_inputs)",
                "batch": int(ids.shape[0]),
                "seq_len": int(ids.shape[1]),
                "stored_as": "input_ids",
            },
            "tolerance": tol.name,
            "contents": {
                "layers": layers,
                "per_layer": [f"layer.{{i}}.{k}" for k in KINDS],
                "tokens": int(ids.numel()),
                "num_experts": spec.num_experts,
                "top_k": spec.top_k_experts,
                "min_topk_margin": {str(i): m for i, m in margins.items()},
                "side": "HF Gemma4TextRouter (input by forward pre-hook, outputs by forward hook)",
            },
            "config": config,
        },
    )


def describe_change(case: Case, old_files: dict[str, bytes] | None, new: Recording) -> str:
    """How many decisions changed and how far the values moved."""
    from safetensors.torch import load

    from harness.compare import tensor_diff

    new_t = load(new.files[SUFFIX])
    layers = sorted({int(n.split(".")[1]) for n in new_t if n.startswith("layer.")})
    if not old_files:
        return f"created {case.name} ({len(layers)} MoE layers, {new_t['input_ids'].numel()} tokens each)"
    try:
        old_t = load(next(v for k, v in old_files.items() if k.endswith(SUFFIX)))
    except Exception:
        return f"updated {case.name} (the old golden was unreadable)"
    if set(old_t) != set(new_t) or any(old_t[n].shape != new_t[n].shape for n in new_t):
        return f"updated {case.name}: tensor names or shapes changed"
    if all(torch.equal(old_t[n], new_t[n]) for n in new_t):
        return f"unchanged {case.name}"
    flips = sum(int((old_t[n] != new_t[n]).any(-1).sum()) for n in new_t if n.endswith(".top_k_index"))
    moved = max(
        (tensor_diff(new_t[n], old_t[n]).scaled, n)
        for n in new_t
        if n.startswith("layer.") and not n.endswith(".top_k_index")
    )
    return f"updated {case.name}: {flips} token decisions changed; largest value change {moved[0]:.2e} at {moved[1]}"


def check(case: Case, entry: dict[str, Any], files: dict[str, bytes], goldens_dir: Path) -> Outcome:
    """HF now and our routers (on the recorded router inputs) against the golden decisions."""
    from harness.parity import DTYPES

    rel, data = file_with_suffix(files, SUFFIX, goldens_dir, case.name)
    path = goldens_dir / rel
    config, dtype_name, seed = entry.get("config"), entry.get("dtype"), entry.get("seed")
    if not isinstance(config, dict) or dtype_name not in DTYPES or not isinstance(seed, int):
        raise GoldenError(
            f"{goldens_dir / 'manifest.json'}: case {case.name!r} lacks a valid config/dtype/seed"
        )
    dtype = DTYPES[dtype_name]
    ids = load_safetensors(data, path, ["input_ids"])["input_ids"]
    hf, spec, _, layers, hf_now = run_hf(json.loads(json.dumps(config)), dtype, seed, ids=ids)
    names = _names(layers)
    golden = load_safetensors(data, path, names)
    for n in names:
        if golden[n].shape != hf_now[n].shape or golden[n].dtype != hf_now[n].dtype:
            raise GoldenError(
                f"{path}: tensor {n!r} is {golden[n].dtype} {tuple(golden[n].shape)}, the recorded case implies "
                f"{hf_now[n].dtype} {tuple(hf_now[n].shape)}"
            )

    ours = build_ours(hf, spec, dtype)
    fed = our_router_inputs(ours, layers, ids)
    ours_on_golden = {**fed, **our_decisions(ours, layers, golden)}
    ours_on_hf = {**fed, **our_decisions(ours, layers, hf_now)}
    bound = tolerance_for(dtype).activations_max_scaled
    seq_len = int(ids.shape[1])
    margins = {i: topk_margins(golden[f"layer.{i}.probs"], spec.top_k_experts) for i in layers}
    # Per layer: our decisions (from the golden inputs), indices first, then what our model feeds its router.
    order = ("top_k_index", "probs", "top_k_weights", "router_input")
    ours_j = judge(ours_on_golden, golden, layers, bound, seq_len, order, margins)
    hf_j = judge(hf_now, golden, layers, bound, seq_len, KINDS, margins)
    live = judge(ours_on_hf, hf_now, layers, bound, seq_len, order)
    status = classify(ours_j.ok, hf_j.ok, live.ok)

    if status == PASS:
        message = (
            f"{ours_j.tokens} token decisions in {len(layers)} layers match; ours vs golden: probs/weights "
            f"{ours_j.values_max:.1e}, router input {ours_j.worst['router_input']:.1e}; HF vs golden: "
            f"{hf_j.values_max:.1e} (bound {bound:.0e})"
        )
    elif status == REGRESSION:
        flips = (
            f"{ours_j.index_mismatches} of {ours_j.tokens} token decisions (top-k experts) differ; "
            if ours_j.index_mismatches
            else "the top-k experts still match; "
        )
        message = f"our router moved away from golden {rel}: {flips}first at {ours_j.first_bad}; " + (
            "HF still matches the golden" if hf_j.ok else f"HF moved too (first at {hf_j.first_bad})"
        )
    elif ours_j.ok:
        message = f"HF's router moved away from golden {rel}: first at {hf_j.first_bad}; ours still match the golden"
    else:
        message = (
            f"HF and our router both moved away from golden {rel} (first at {hf_j.first_bad}) and still agree "
            "with each other: a shared dependency or the reference builder changed"
        )
    details = []
    if entry.get("tolerance") != tolerance_for(dtype).name:
        details.append(
            f"tolerance policy is now {tolerance_for(dtype).name!r}; recorded with {entry.get('tolerance')!r}"
        )
    return Outcome(
        case.name,
        status,
        message,
        details,
        metrics={
            "file": rel,
            "bound": bound,
            "ours_vs_golden": ours_j.values_max,
            "hf_vs_golden": hf_j.values_max,
            "ours_vs_hf": live.values_max,
            "ours": ours_j.to_json(),
            "hf": hf_j.to_json(),
            "live": live.to_json(),
            "min_topk_margin": float(min(m.min() for m in margins.values())),
        },
    )

"""Our model against HF on one device (CUDA in ``tox -e gpu-parity``; CPU in the unit tests of this runner).

Per run, on the same seeded inputs and the same weights (HF's, rounded to the run dtype):

1. HF ``Gemma4ForCausalLM`` (eager attention) in the run dtype on the device: the reference;
2. the exact-fp64 HF reference (``harness.reference``: HF's fp32 casts removed) on the same weights
   upcast: the truth, which measures the reference's own rounding noise in this run;
3. our model, built by ``build`` (default: the slime model provider's path), on the device.

Bounds (``harness.tolerances``): bf16 -> ``gpu_bf16`` (fixed floor raised to 2x the reference's noise,
KL 4x), per-token log-prob -> ``gpu_logprob_bound``, argmax agreement on decisive tokens (reference top-2
margin above twice the logits bound) must be 1; fp32 -> ``reordered(FP32_STOCK)``. Models are built and
freed one at a time, so a real checkpoint's first layers fit next to each other on one GPU.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.compare import logit_stats, tensor_diff
from harness.parity import (
    ParitySource,
    capture_mcore,
    capture_order,
    cu_seqlens_of,
    describe_point,
    make_inputs,
    run_reference,
)
from harness.tolerances import FP32_STOCK, gpu_bf16, gpu_logprob_bound, reordered


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_build(hf_config: Any, dtype: torch.dtype, backend: str = "auto") -> torch.nn.Module:
    """Our model through the slime model provider (flags -> args -> TransformerConfig -> build_model)."""
    from harness.testing.slime import provider_model

    return provider_model(hf_config, dtype, gemma4_attention_backend=backend)


def attention_backends(model: torch.nn.Module) -> dict[int, str | None]:
    """The path each layer's core attention took in the last forward (``Gemma4CoreAttention.last_backend``)."""
    return {
        i: getattr(layer.self_attention.core_attention, "last_backend", None)
        for i, layer in enumerate(model.decoder.layers)
    }


def _to_cpu(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in acts.items()}


def _decisive_argmax(ours: torch.Tensor, ref: torch.Tensor, margin: float) -> tuple[float, int]:
    """Argmax agreement over tokens whose reference top-2 margin exceeds ``margin``; (agreement, count)."""
    top2 = ref.to(torch.float64).topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > margin
    count = int(decisive.sum())
    if count == 0:
        return 1.0, 0
    agree = (ours.argmax(-1) == ref.argmax(-1))[decisive]
    return float(agree.to(torch.float64).mean()), count


def reference_side(
    source: ParitySource,
    ids: torch.Tensor,
    cu: torch.Tensor,
    packed: bool,
    *,
    device: torch.device,
    exact_device: torch.device,
    dtype: torch.dtype,
    seed: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """HF in ``dtype`` on ``device`` and the exact-fp64 reference on the same (rounded) weights; CPU results."""
    from harness.reference import build_reference_model, hf_text_state_dict

    t = time.perf_counter()
    hf = build_reference_model(source.hf_config, dtype, seed=seed, weights=source.weights)
    weights = {k: v.detach().clone() for k, v in hf_text_state_dict(hf).items()}  # run-dtype weights
    hf.to(device)
    with torch.no_grad():
        ref_logits, ref_acts = run_reference(hf, ids.to(device), cu.to(device), packed, grads=False)
    out = {"weights": weights, "ref_logits": ref_logits.to("cpu"), "ref_acts": _to_cpu(ref_acts)}
    del hf
    _free(device)
    timings["reference"] = time.perf_counter() - t

    t = time.perf_counter()
    exact = build_reference_model(
        source.hf_config,
        torch.float64,
        seed=seed,
        weights={k: v.to(torch.float64) for k, v in weights.items()},
    )
    exact.to(exact_device)
    with torch.no_grad():
        exact_logits, exact_acts = run_reference(
            exact, ids.to(exact_device), cu.to(exact_device), packed, False
        )
    out |= {"exact_logits": exact_logits.to("cpu"), "exact_acts": _to_cpu(exact_acts)}
    del exact
    _free(exact_device)
    timings["exact_fp64"] = time.perf_counter() - t
    return out


def compare(
    spec: Any,
    ref: dict[str, Any],
    our_logits: torch.Tensor,
    our_acts: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Metrics, noise, bounds and failures of our logits (and activations, when captured) against HF."""
    ref_logits, exact_logits = ref["ref_logits"], ref["exact_logits"]
    noise_logits = tensor_diff(ref_logits, exact_logits).max_abs
    noise_acts = max(
        (
            tensor_diff(ref["ref_acts"][k], ref["exact_acts"][k]).scaled
            for k in ref["exact_acts"]
            if k != "logits"
        ),
        default=0.0,
    )
    noise_stats = logit_stats(ref_logits, exact_logits)
    if dtype == torch.bfloat16:
        tol = gpu_bf16(noise_logits, noise_acts, noise_stats.kl_mean)
        lp_bound = gpu_logprob_bound(noise_stats.max_abs_logprob)
    else:
        tol = reordered(FP32_STOCK, noise_logits, noise_acts, noise_stats.kl_mean)
        lp_bound = 2 * tol.logits_max_abs  # |d log p| <= 2 max|dz|: implied by the logits bound
    names = capture_order(spec) if our_acts is not None else ["logits"]
    acts = dict(our_acts or {}) | {"logits": our_logits}
    points = {
        name: tensor_diff(acts[name], ref["ref_acts"][name] if name != "logits" else ref_logits)
        for name in names
    }
    stats = logit_stats(our_logits, ref_logits)
    agreement, decisive = _decisive_argmax(our_logits, ref_logits, 2 * tol.logits_max_abs)
    activations_worst = max((d.scaled for n, d in points.items() if n != "logits"), default=0.0)

    failures: list[str] = []
    first = None
    for name in names:
        d = points[name]
        if (d.max_abs > tol.logits_max_abs) if name == "logits" else (d.scaled > tol.activations_max_scaled):
            first = describe_point(spec, name)
            break
    if points["logits"].max_abs > tol.logits_max_abs:
        failures.append(f"logits max abs {points['logits'].max_abs:.3e} > {tol.logits_max_abs:.3e}")
    if activations_worst > tol.activations_max_scaled:
        failures.append(f"activations max scaled {activations_worst:.3e} > {tol.activations_max_scaled:.3e}")
    if stats.max_abs_logprob > lp_bound:
        failures.append(f"per-token |d log p| {stats.max_abs_logprob:.3e} > {lp_bound:.3e}")
    if tol.kl_max is not None and stats.kl_mean > tol.kl_max:
        failures.append(f"mean KL {stats.kl_mean:.3e} > {tol.kl_max:.3e}")
    if tol.argmax_min is not None and agreement < tol.argmax_min:
        failures.append(f"argmax agreement on {decisive} decisive tokens {agreement:.4f} < {tol.argmax_min}")
    if first is None and failures:
        first = "logits"
    return {
        "pass": not failures,
        "failures": failures,
        "first_divergence": first,
        "metrics": {
            "logits_max_abs": points["logits"].max_abs,
            "activations_max_scaled": activations_worst,
            "logprob_max_abs": stats.max_abs_logprob,
            "kl_mean": stats.kl_mean,
            "kl_max": stats.kl_max,
            "argmax_agreement": stats.argmax_agreement,
            "argmax_agreement_decisive": agreement,
            "decisive_tokens": decisive,
        },
        "reference_noise_vs_exact_fp64": {
            "logits_max_abs": noise_logits,
            "activations_max_scaled": noise_acts,
            "logprob_max_abs": noise_stats.max_abs_logprob,
            "kl_mean": noise_stats.kl_mean,
            "argmax_agreement": noise_stats.argmax_agreement,
        },
        "bounds": {**tol.to_json(), "logprob_max_abs": lp_bound},
    }


def _packed_params(cu: torch.Tensor, device: torch.device):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_dev = cu.to(device)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_dev,
        cu_seqlens_kv=cu_dev,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def run_device_parity(
    source: ParitySource,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 2,
    seq_len: int = 64,
    seed: int = 0,
    packed: tuple[int, ...] | None = None,
    backend: str = "auto",
    build: Callable[..., torch.nn.Module] | None = None,
    exact_device: str | torch.device | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Run both models and the exact reference; the JSON-ready result (``pass``, metrics, bounds, failures)."""
    from gemma4.conversion.mapping import hf_to_mcore, load_mcore_state_dict
    from gemma4.runtime import init_single_process

    device = torch.device(device)
    exact_device = torch.device(exact_device) if exact_device is not None else device
    spec = source.spec
    if packed:
        batch, seq_len = 1, sum(packed)
    ids = make_inputs(spec, batch, seq_len, seed)
    cu = cu_seqlens_of(list(packed) if packed else [seq_len])
    timings: dict[str, float] = {}
    ref = reference_side(
        source,
        ids,
        cu,
        bool(packed),
        device=device,
        exact_device=exact_device,
        dtype=dtype,
        seed=seed,
        timings=timings,
    )

    t = time.perf_counter()
    if device.type == "cuda":  # Megatron on GPU expects NCCL: a world of one, in-process store, no port
        import torch.distributed as dist

        if not dist.is_initialized():
            torch.cuda.set_device(device.index or 0)
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    init_single_process()
    if device.type == "cuda":
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    model = (build or default_build)(source.hf_config, dtype, backend=backend)
    load_mcore_state_dict(model, hf_to_mcore(ref["weights"], spec), source="HF weights")
    model.to(device).eval()
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), capture_mcore(model, acts):
        our_logits = model(ids.to(device), packed_seq_params=_packed_params(cu, device) if packed else None)
    our_logits, our_acts = our_logits.detach().to("cpu"), _to_cpu(acts)
    backends = attention_backends(model)
    suffixes = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    linear_classes = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(suffixes)})
    del model
    _free(device)
    timings["megatron"] = time.perf_counter() - t

    result = compare(spec, ref, our_logits, our_acts, dtype)
    return {
        "label": label or source.label,
        **result,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "seq_len": seq_len,
        "packed": list(packed) if packed else None,
        "backend_requested": backend,
        "attention_backends": backends,
        "linear_classes": linear_classes,
        "timings_s": timings,
    }


# ---- context parallelism over GPUs (spawned NCCL ranks) ---------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cp_worker(rank, world, port, hf_config, dtype, mcore_weights, ids, cu, packed, conn) -> None:
    import io
    import traceback

    try:
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from gemma4.conversion.mapping import load_mcore_state_dict
        from gemma4.model.sequence_layout import shard_for_cp
        from harness.testing.slime import provider_model

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world)
        parallel_state.initialize_model_parallel(context_parallel_size=world)
        model_parallel_cuda_manual_seed(0)
        model = provider_model(hf_config, dtype, context_parallel_size=world)
        load_mcore_state_dict(model, mcore_weights, source="HF weights")
        model.cuda().eval()
        local = shard_for_cp(ids, cu, world, rank).cuda()
        with torch.no_grad():
            logits = model(
                local, packed_seq_params=_packed_params(cu, torch.device("cuda")) if packed else None
            )
        buf = io.BytesIO()
        torch.save(("ok", logits.cpu()), buf)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        buf = io.BytesIO()
        torch.save(("error", traceback.format_exc()), buf)
    conn.send_bytes(buf.getvalue())
    conn.close()


def run_cp_parity(
    source: ParitySource,
    *,
    cp: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 2,
    seq_len: int = 64,
    packed: tuple[int, ...] | None = None,
    seed: int = 0,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Our model on ``cp`` GPUs (zig-zag context parallelism, NCCL) against HF on GPU 0 (logits level)."""
    import io
    import multiprocessing as mp

    from gemma4.conversion.mapping import hf_to_mcore
    from gemma4.model.sequence_layout import unshard_from_cp

    if packed:
        batch, seq_len = 1, sum(packed)
    spec = source.spec
    ids = make_inputs(spec, batch, seq_len, seed)
    cu = cu_seqlens_of(list(packed) if packed else [seq_len])
    timings: dict[str, float] = {}
    dev = torch.device("cuda", 0)
    ref = reference_side(
        source, ids, cu, bool(packed), device=dev, exact_device=dev, dtype=dtype, seed=seed, timings=timings
    )
    weights = hf_to_mcore(ref["weights"], spec)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs, conns = [], []
    for rank in range(cp):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_cp_worker, args=(rank, cp, port, source.hf_config, dtype, weights, ids, cu, packed, child)
        )
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    parts, errors = [], []
    deadline = time.monotonic() + timeout_s
    try:
        for rank, conn in enumerate(conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                errors.append(f"rank {rank}: timed out")
                continue
            status, payload = torch.load(io.BytesIO(conn.recv_bytes()), weights_only=True)
            (parts.append(payload) if status == "ok" else errors.append(f"rank {rank}:\n{payload}"))
    finally:
        for p in procs:  # only the workers started here
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("context-parallel run failed:\n" + "\n".join(errors))
    our_logits = unshard_from_cp(parts, cu)
    result = compare(spec, ref, our_logits, None, dtype)
    return {
        "label": f"{source.label} cp{cp}" + (" packed" if packed else ""),
        **result,
        "device": f"{cp} x {torch.cuda.get_device_name(0)}",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "seq_len": seq_len,
        "packed": list(packed) if packed else None,
        "attention_backends": {},
        "timings_s": timings,
    }


def require_flash() -> None:
    """Skip loudly when flash-attn is absent (``GEMMA4_REQUIRE_FLASH=1`` makes it a failure)."""
    import pytest

    from gemma4.model.core_attention import flash_available

    if flash_available():
        return
    message = "flash_attn is not installed: the flash-attn varlen path was NOT checked"
    if os.environ.get("GEMMA4_REQUIRE_FLASH") == "1":
        pytest.fail(message + " (GEMMA4_REQUIRE_FLASH=1)", pytrace=False)
    pytest.skip(message)


def summary_line(result: dict[str, Any]) -> str:
    """One line for the test log and the closing note."""
    m, n, b = result["metrics"], result["reference_noise_vs_exact_fp64"], result["bounds"]
    return (
        f"{result['label']} [{result['dtype']} {result['device']}] {'PASS' if result['pass'] else 'FAIL'}: "
        f"logits {m['logits_max_abs']:.3e} (<= {b['logits_max_abs']:.3e}; ref noise {n['logits_max_abs']:.3e}), "
        f"log p {m['logprob_max_abs']:.3e} (<= {b['logprob_max_abs']:.3e}), KL {m['kl_mean']:.2e} "
        f"(<= {b['kl_max']:.2e}), argmax {m['argmax_agreement']:.4f} (decisive {m['argmax_agreement_decisive']:.4f} "
        f"of {m['decisive_tokens']}), acts {m['activations_max_scaled']:.3e} (<= {b['activations_max_scaled']:.3e}); "
        f"attention {sorted(set(result['attention_backends'].values()), key=str)}"
    )


def write_report(results: list[dict[str, Any]], path: Path) -> None:
    """All results of the session as one JSON file (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)

"""The e2e smoke's gates: each bound, why it is what it is, and the check over the run's records.

Log-prob gap (per response token, ``|log p_rollout - log p_train|``, both from softcapped logits at
temperature 1). ``log p_i = z_i - logsumexp(z)`` moves by at most ``|dz_i| + max_j |dz_j| <= 2 max|dz|``
when the logits move by ``dz``, so the gap bound follows from the logits bound of the cross-framework
tolerance policy (:mod:`harness.tolerances`):

* fp64: ``1e-9`` = ``FP64_EXACT.logits_max_abs``. Both sides compute the same function in fp64 (HF in
  exact mode, see :mod:`harness.reference`); the engine decodes with a KV cache and the trainer runs the
  whole sequence, which only reorders sums: measured 4e-15..6e-14 (TP/EP/SP included). A weight that
  differs between trainer and engine moves log-probs by far more: one Adam step (lr 1e-4) moves the most
  affected response token by 0.26..0.77 nats on the tiny presets.
* fp32: ``1e-4`` = ``2 x FP32_STOCK.logits_max_abs`` (5e-5, GEMM packing and reduction order): measured
  3e-6..7e-6 (cached decoding against a full forward, TP all-reduces, expert dispatch).

Step-0 KL against the reference (exact KL over the vocabulary, averaged over response tokens): the actor
and the reference are the same code on the same initial weights, so it is exactly 0; ``1e-12`` catches
any difference in how either was loaded while admitting nothing else.

Detectability: every optimizer step must move the trainer's log-probs on its own batch by at least
``DETECTABLE_FACTOR`` times the gap bound (else a skipped or stale sync could hide under the bound).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.tolerances import FP32_STOCK, FP64_EXACT

GAP_BOUNDS: dict[torch.dtype, float] = {
    torch.float64: FP64_EXACT.logits_max_abs,
    torch.float32: 2 * FP32_STOCK.logits_max_abs,
}
KL0_BOUND = 1e-12
DETECTABLE_FACTOR = 10.0
GAP_WHY = (
    "|d log p| <= 2 max|d logit|; fp64: the exact-fp64 cross-framework logits bound (1e-9; measured <= 6e-14); "
    "fp32: 2 x the fp32 cross-framework logits bound (5e-5; measured <= 7e-6). One Adam step moves the most "
    "affected log-prob by > 0.2."
)

_FINITE_KEYS = (
    "loss",
    "grad_norm",
    "kl_ref_mean",
    "kl_ref_max",
    "kl_ref_k3_mean",
    "logprob_gap_mean",
    "reward_mean",
    "advantage_abs_mean",
    "weights_max_change",
    "policy_shift_max",
)


def gap_bound(dtype: torch.dtype) -> float:
    """The per-token log-prob gap bound of a run dtype."""
    if dtype not in GAP_BOUNDS:
        raise ValueError(f"no log-prob gap bound for {dtype}")
    return GAP_BOUNDS[dtype]


def evaluate(records: list[dict[str, Any]], dtype: torch.dtype, steps: int) -> list[str]:
    """Every gate over the per-iteration records; returns the failures, each naming the gate and value."""
    bound = gap_bound(dtype)
    failures: list[str] = []
    if len(records) != steps + 1:
        failures.append(f"run: {len(records)} iterations recorded, expected {steps + 1}")
    for rec in records:
        k = rec["iteration"]
        sync = rec.get("sync")
        if sync is None or sync.get("index") != k:
            got = None if sync is None else sync.get("index")
            failures.append(
                f"sync {k}: the rollout engine received no weights before iteration {k} (last sync {got})"
            )
        else:
            if sync["num_missing"]:
                failures.append(
                    f"sync {k}: {sync['num_missing']} engine tensors never received (first: {sync['missing'][:3]})"
                )
            if sync["num_errors"]:
                failures.append(
                    f"sync {k}: engine rejected {sync['num_errors']} tensors ({sync['errors'][:3]})"
                )
            if k > 0 and not sync["rollout_weights_max_change"] > 0:
                failures.append(
                    f"sync {k}: the rollout engine's weights did not change (stale or repeated weights)"
                )
        gap = rec["logprob_gap_max"]
        if not gap <= bound:
            failures.append(
                f"iteration {k}: train/rollout log-prob gap {gap:.3e} > {bound:.0e} on response tokens "
                f"(sampled {rec['logprob_gap_max_sampled']:.3e}, greedy {rec['logprob_gap_max_greedy']:.3e}) "
                f"after sync {k}"
            )
        if rec["mask_mismatches"]:
            failures.append(
                f"iteration {k}: loss mask does not cover exactly the response tokens "
                f"({rec['mask_mismatches']} positions differ)"
            )
        if rec["sampler_deviation"] != 0.0:
            failures.append(
                f"iteration {k}: the sampler's logits differ from the policy's by {rec['sampler_deviation']:.3e} "
                "(temperature, top-k or top-p changed the distribution)"
            )
        if k == 0 and not rec["kl_ref_max"] <= KL0_BOUND:
            failures.append(
                f"iteration 0: KL to the reference {rec['kl_ref_max']:.3e} > {KL0_BOUND:.0e} (actor and reference "
                "differ before any step)"
            )
        bad = [key for key in _FINITE_KEYS if key in rec and not math.isfinite(rec[key])]
        if bad:
            failures.append(f"iteration {k}: non-finite metrics {bad}")
        if k < steps:
            if rec["nonzero_advantages"] == 0:
                failures.append(f"iteration {k}: no learning signal (every advantage is zero)")
            if not rec.get("weights_max_change", 0.0) > 0:
                failures.append(f"step {k + 1}: the optimizer step did not change the weights")
            shift = rec.get("policy_shift_max", 0.0)
            if not shift >= DETECTABLE_FACTOR * bound:
                failures.append(
                    f"step {k + 1}: log-probs moved by only {shift:.3e} (< {DETECTABLE_FACTOR:g} x the gap bound), "
                    "so a missed sync would not be detectable"
                )
    return failures

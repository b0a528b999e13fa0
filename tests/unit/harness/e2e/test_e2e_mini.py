"""``e2e-mini`` passes on a dense and an MoE preset, fp64 and fp32, in one process and on TP/EP ranks.

What each assertion catches: a gap above the bound means the engine generated with other weights than the
trainer holds (sync, conversion or mask bug); KL at step 0 means actor and reference were loaded differently;
an unchanged weight or engine means an optimizer step or a sync that did nothing (which would make the gap
check vacuous); the layout comparison means TP/EP training is not the same computation as TP 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.e2e.gates import DETECTABLE_FACTOR, KL0_BOUND, gap_bound

BOUNDS = {"float64": gap_bound(torch.float64), "float32": gap_bound(torch.float32)}


def _check_run(result, dtype: str, explain) -> None:
    assert result["pass"], explain(result)
    bound = BOUNDS[dtype]
    steps = result["steps"]
    assert len(steps) == result["num_steps"] + 1
    assert result["max_logprob_gap"] == max(s["logprob_gap_max"] for s in steps) <= bound
    assert result["step0_kl"] <= KL0_BOUND
    for s in steps:
        k = s["iteration"]
        assert s["sync"]["index"] == k and s["sync"]["num_missing"] == 0 and s["sync"]["num_errors"] == 0
        assert s["sync"]["buckets"] > 1  # the sync really is bucketed
        assert s["mask_mismatches"] == 0 and s["response_tokens"] > 0
        assert s["sampler_deviation"] == 0.0
        if k > 0:
            assert s["sync"]["rollout_weights_max_change"] > 0
        if k < result["num_steps"]:
            assert s["nonzero_advantages"] > 0
            assert s["weights_max_change"] > 0 and s["changed_tensors"] > 0
            assert s["policy_shift_max"] >= DETECTABLE_FACTOR * bound
            assert all(math.isfinite(s[key]) for key in ("loss", "grad_norm", "kl_ref_mean"))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b"])
def test_single_process(e2e, explain, preset, dtype):
    result = e2e(preset=preset, dtype=dtype)
    _check_run(result, dtype, explain)
    if dtype == "float64":  # the exact path: agreement at rounding level, far below the bound
        assert result["max_logprob_gap"] < 1e-12
    steps = result["steps"]
    assert steps[1]["kl_ref_max"] > 0  # the step moved the actor away from the reference
    assert len({s["rollout_digest"] for s in steps}) == len(steps)  # new rollouts every iteration


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize(
    "preset,tp,ep",
    [("tiny-31b", 2, 1), ("tiny-26b-a4b", 1, 2)],
    ids=["dense-tp2", "moe-ep2"],
)
def test_multiprocess_layouts_equal_single_process(e2e, explain, preset, tp, ep):
    """Trainer on forked ranks (engine on rank 0): gates hold, and the run is the TP 1 run: same rollouts
    (token for token) and losses equal to fp64 rounding."""
    result = e2e(preset=preset, tp=tp, ep=ep)
    _check_run(result, "float64", explain)
    assert result["layout"]["world_size"] == tp * ep
    single = e2e(preset=preset)
    for ours, ref in zip(result["steps"], single["steps"]):
        assert ours["rollout_digest"] == ref["rollout_digest"]
        if "loss" in ref:
            assert abs(ours["loss"] - ref["loss"]) <= 1e-9
            assert abs(ours["grad_norm"] - ref["grad_norm"]) <= 1e-9 * max(1.0, ref["grad_norm"])


@pytest.mark.xdist_group("multiprocess")
def test_moe_tp2_sequence_parallel_fp32(e2e, explain):
    """MoE under TP needs sequence parallelism (rows padded to a multiple of TP); fp32 reorders sums."""
    result = e2e(preset="tiny-26b-a4b", tp=2, dtype="float32", steps=1)
    assert result["layout"]["sequence_parallel"]
    _check_run(result, "float32", explain)

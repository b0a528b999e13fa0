"""Planted faults: each classic RL weight-sync / mask bug must turn ``e2e-mini`` red, named.

Each mutant is applied with ``monkeypatch`` to the sync or the trainer (never to the HF engine, the oracle,
nor to the gates). Every one moves some response token's log-prob by far more than even the fp32 bound, so
the fp64 runs here would be red in fp32 too.
"""

from __future__ import annotations

import pytest
import torch

import harness.e2e.run as e2e_run
import harness.e2e.sync as e2e_sync
import harness.e2e.trainer as e2e_trainer
from harness.e2e.gates import gap_bound
from harness.e2e.run import E2EConfig, run_e2e

FP32_BOUND = gap_bound(torch.float32)


def _run(**kwargs):
    return run_e2e(E2EConfig(**({"steps": 1} | kwargs)))


def _assert_red(result, *needles: str, iteration: int) -> None:
    assert not result["pass"], "the planted fault went unnoticed"
    text = "\n".join(result["failures"])
    for needle in needles:
        assert needle in text, f"expected {needle!r} among the failures:\n{text}"
    gap = result["steps"][iteration]["logprob_gap_max"]
    assert gap > 100 * FP32_BOUND, f"iteration {iteration}: gap {gap:.3e} would hide under a looser bound"


def test_skipped_sync_is_caught(monkeypatch):
    """The trainer steps but nobody calls update_weights: rollouts come from the pre-step policy."""
    real = e2e_run.sync_weights

    def skip_after_first(model, engine, args, bucket_bytes, index):
        if index == 0:
            return real(model, engine, args, bucket_bytes, index)
        return None

    monkeypatch.setattr(e2e_run, "sync_weights", skip_after_first)
    result = _run()
    _assert_red(
        result,
        "iteration 1: train/rollout log-prob gap",
        "sync 1: the rollout engine received no weights",
        iteration=1,
    )
    assert result["steps"][0]["logprob_gap_max"] < 1e-12  # sync 0 happened: the first rollout agrees


def test_tensor_from_wrong_layer_is_caught(monkeypatch):
    """One tensor is fed under another layer's name (same shape: layers 0 and 1 are both sliding)."""
    real = e2e_sync.iter_global_params
    victim, source = (
        "decoder.layers.1.self_attention.linear_proj.weight",
        "decoder.layers.0.self_attention.linear_proj.weight",
    )

    def wrong_layer(model):
        for name, t in real(model):
            if name == victim:
                t = dict(model.named_parameters())[source].detach()
            yield name, t

    monkeypatch.setattr(e2e_sync, "iter_global_params", wrong_layer)
    _assert_red(_run(), "iteration 0: train/rollout log-prob gap", iteration=0)


@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b"])
def test_gate_up_swapped_in_sync_is_caught(monkeypatch, preset):
    """GLU halves swapped on the way out: dense gate_proj <-> up_proj, experts' fused [gate; up] rows."""
    real = e2e_sync.convert_gemma4_to_hf

    def swapped(args, name, param):
        out = []
        for hf_name, t in real(args, name, param):
            if hf_name.endswith("mlp.gate_proj.weight"):
                hf_name = hf_name.replace("gate_proj", "up_proj")
            elif hf_name.endswith("mlp.up_proj.weight"):
                hf_name = hf_name.replace("up_proj", "gate_proj")
            elif hf_name.endswith(".gate_proj.weight") and ".experts." in hf_name:
                hf_name = hf_name.replace(".gate_proj.", ".up_proj.")
            elif hf_name.endswith(".up_proj.weight") and ".experts." in hf_name:
                hf_name = hf_name.replace(".up_proj.", ".gate_proj.")
            out.append((hf_name, t))
        return out

    monkeypatch.setattr(e2e_sync, "convert_gemma4_to_hf", swapped)
    _assert_red(_run(preset=preset), "iteration 0: train/rollout log-prob gap", iteration=0)


def test_old_per_expert_names_are_caught(plant_old_expert_names):
    """Experts sent as ``experts.{e}.gate_up_proj`` / ``experts.{e}.down_proj`` (names SGLang skips)."""
    result = _run(preset="tiny-26b-a4b")
    _assert_red(result, "iteration 0: train/rollout log-prob gap", "experts.0.gate_up_proj", iteration=0)


def test_mask_shifted_by_one_token_is_caught(monkeypatch):
    """The loss mask applied to logit positions without the one-token shift (trains the wrong tokens)."""
    monkeypatch.setattr(e2e_trainer, "logit_mask_from_loss_mask", lambda loss_mask: loss_mask[:, :-1].bool())
    result = _run()
    _assert_red(result, "iteration 0: loss mask does not cover exactly the response tokens", iteration=0)


def test_stale_pre_step_copy_is_caught(monkeypatch):
    """The sync sends a copy of the weights taken before the optimizer step."""
    real = e2e_sync.iter_global_params
    previous: list[list[tuple[str, torch.Tensor]]] = []

    def stale(model):
        current = [(name, t.clone()) for name, t in real(model)]
        yield from (previous[-1] if previous else current)
        previous.append(current)

    monkeypatch.setattr(e2e_sync, "iter_global_params", stale)
    result = _run()
    _assert_red(
        result,
        "iteration 1: train/rollout log-prob gap",
        "sync 1: the rollout engine's weights did not change",
        iteration=1,
    )


@pytest.mark.xdist_group("multiprocess")
def test_tp_gather_ignoring_partition_stride_is_caught(monkeypatch):
    """TP shards concatenated instead of re-interleaved: GLU fc1 becomes [gate_0; up_0; gate_1; up_1]."""

    def plain_cat(shards, param):
        if len(shards) == 1 or not getattr(param, "tensor_model_parallel", False):
            return shards[0]
        return torch.cat(list(shards), dim=param.partition_dim)

    monkeypatch.setattr(e2e_sync, "gather_like", plain_cat)
    _assert_red(_run(tp=2), "iteration 0: train/rollout log-prob gap", iteration=0)


@pytest.mark.xdist_group("multiprocess")
def test_ep_local_expert_index_is_caught(monkeypatch):
    """Experts of every EP rank sent under their local index: experts 0..3 arrive twice, 4..7 never."""
    from gemma4.slime.weight_sync import slime_global_expert_name

    # slime's own rule for non-TE names: the rank-local index (offset 0 on every EP rank)
    monkeypatch.setattr(
        e2e_sync,
        "slime_global_expert_name",
        lambda name, ep_rank, ep, num_experts: slime_global_expert_name(name, 0, ep, num_experts),
    )
    result = _run(preset="tiny-26b-a4b", ep=2)
    _assert_red(
        result,
        "sync 0: engine rejected",
        "never received",
        "iteration 0: train/rollout log-prob gap",
        iteration=0,
    )


@pytest.mark.xdist_group("multiprocess")
def test_tp_replicas_diverging_is_caught(monkeypatch):
    """q/k-norm gradients not all-reduced over TP: each rank steps its replica of the norm differently, the
    engine gets rank 0's copy, and the trainer (every rank's own copy) no longer computes what it serves."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def finalize_without_tp_norm_reduce(model, config):
        group = ps.get_data_parallel_group(with_context_parallel=True)
        for p in model.parameters():
            if p.grad is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)

    monkeypatch.setattr(e2e_trainer, "finalize_grads", finalize_without_tp_norm_reduce)
    result = _run(tp=2)
    assert not result["pass"] and result["steps"][0]["logprob_gap_max"] < 1e-12  # before the step: equal
    gap = result["steps"][1]["logprob_gap_max"]
    assert gap > 10 * FP32_BOUND, f"gap {gap:.3e}"
    assert any(f.startswith("iteration 1: train/rollout log-prob gap") for f in result["failures"])

"""The trainer: our Megatron Gemma 4 (actor + frozen reference), GRPO loss, a real Adam step.

Per rank (or the single process), on the rows this data-parallel rank owns (expert-parallel ranks are
data-parallel replicas of the dense weights, as in Megatron):

* teacher-forced log-probs of every token from the softcapped logits (temperature 1), vocab-parallel
  logits gathered over TP;
* the GRPO objective on sampled rows: PPO-clipped policy gradient with ``old = detach(new)`` (on-policy,
  ratio 1, as slime recomputes old log-probs) and a ``k3`` KL penalty against the reference
  (slime's ``low_var_kl``), averaged over all trained response tokens of the global batch;
* gradients finalised as Megatron's DDP + ``finalize_model_grads`` would (summed over data parallel;
  sequence-parallel and q/k norms over TP), global grad-norm clipping, ``torch.optim.Adam`` (no weight
  decay, so an unchanged weight means a zero gradient, never hidden by decay).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from harness.e2e.batch import expected_logit_mask, logit_mask_from_loss_mask
from harness.parity import finalize_grads


def _world_reduce(value: torch.Tensor, op, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=op, group=group)
    return value


class Trainer:
    """Actor + reference Megatron models on this rank, with the optimizer."""

    def __init__(
        self,
        spec: Any,
        dtype: torch.dtype,
        full_weights: dict[str, torch.Tensor],
        *,
        tp: int,
        ep: int,
        sequence_parallel: bool,
        lr: float,
        kl_coef: float,
        clip_eps: float,
        grad_clip: float,
    ) -> None:
        from megatron.core import parallel_state as ps

        from gemma4.model.build import build_gemma4_model
        from gemma4.parallel import load_full_state_dict

        self.dtype = dtype
        self.cdt = torch.promote_types(dtype, torch.float32)
        self.tp = tp
        self.kl_coef, self.clip_eps, self.grad_clip = kl_coef, clip_eps, grad_clip
        overrides = {"expert_model_parallel_size": ep} if spec.enable_moe else {}
        tp_rank, ep_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.models = []
        for _ in range(2):
            model = build_gemma4_model(
                spec, dtype, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, **overrides
            )
            load_full_state_dict(model, full_weights, tp_rank, tp, ep_rank, ep)
            self.models.append(model)
        self.actor, self.ref = self.models
        self.ref.eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        from gemma4.slime.model_provider import freeze_router_scale

        freeze_router_scale(self.actor)  # as slime's provider does (SGLang folds router.scale once)
        self.optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self._norm_owner = self._grad_norm_owners(tp_rank)

    def _grad_norm_owners(self, tp_rank: int) -> dict[str, bool]:
        """Which local parameters this rank counts in the global grad norm (each element exactly once)."""
        from megatron.core import parallel_state as ps

        etp_rank = ps.get_expert_tensor_parallel_rank()
        owners = {}
        for name, p in self.actor.named_parameters():
            expert = ".mlp.experts.local_experts." in name
            sharded = getattr(p, "tensor_model_parallel", False)
            first_tp = (etp_rank if expert else tp_rank) == 0
            owners[name] = (sharded or first_tp) and (expert or self.dp_rank == 0)
        return owners

    # ---- forward ---------------------------------------------------------------------------------------

    def log_probs(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary log-probs ``[b, s - 1, V]`` of the next token at every position."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = model(ids)  # [b, s, V / tp], softcapped
        if self.tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        return torch.log_softmax(logits[:, :-1].to(self.cdt), dim=-1)

    def local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This data-parallel rank's consecutive slice of the batch rows."""
        n = batch["input_ids"].shape[0]
        rows = n // self.dp_size
        sl = slice(self.dp_rank * rows, (self.dp_rank + 1) * rows)
        return {k: v[sl] for k, v in batch.items()}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of this rank's actor parameters."""
        return {n: p.detach().clone() for n, p in self.actor.named_parameters()}

    # ---- one iteration ---------------------------------------------------------------------------------

    def iteration(self, batch: dict[str, torch.Tensor], update: bool) -> dict[str, Any]:
        """Gap, KL and mask checks on the batch; then (``update``) one GRPO + Adam step.

        Returns metrics reduced over ranks (maxima over the world, sums over data parallel).
        """
        full_n_tokens = (logit_mask_from_loss_mask(batch["loss_mask"]) & batch["train"].unsqueeze(1)).sum()
        b = self.local_rows(batch)
        ids = b["input_ids"]
        length = ids.shape[1]
        mask = logit_mask_from_loss_mask(b["loss_mask"])
        expected = expected_logit_mask(b["prompt_length"], b["response_length"], length)
        train_rows = b["train"].unsqueeze(1)

        self.actor.train()
        self.optimizer.zero_grad(set_to_none=True)
        lp_actor = self.log_probs(self.actor, ids)
        with torch.no_grad():
            lp_ref = self.log_probs(self.ref, ids)
        labels = ids[:, 1:].unsqueeze(-1)
        tok_lp = lp_actor.gather(-1, labels).squeeze(-1)  # [b, s-1]
        tok_ref = lp_ref.gather(-1, labels).squeeze(-1)
        new_lp = tok_lp.detach()

        # The gap covers every token the engine generated and every token the loss trains; a trained
        # position the engine never generated has no rollout log-prob (NaN) and counts as infinite.
        gap = (b["rollout_logprobs"] - new_lp).abs()
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("inf")), gap)
        checked = mask | expected
        greedy_rows = ~b["train"]

        def masked_max(values: torch.Tensor, sel: torch.Tensor) -> float:
            return float(values[sel].max()) if bool(sel.any()) else 0.0

        kl_full = (lp_actor.detach().exp() * (lp_actor.detach() - lp_ref)).sum(-1)  # exact KL per position
        log_ratio_ref = tok_ref - tok_lp
        k3 = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        greedy_match = (lp_actor.detach().argmax(-1) == ids[:, 1:]) & mask & greedy_rows.unsqueeze(1)

        maxima = torch.tensor(
            [
                masked_max(gap, checked & train_rows),
                masked_max(gap, checked & greedy_rows.unsqueeze(1)),
                masked_max(kl_full, mask),
            ],
            dtype=torch.float64,
        )
        sums = torch.tensor(
            [
                float(gap[checked].sum()) if bool(checked.any()) else 0.0,
                float(mask.sum()),
                float((mask != expected).sum()),
                float(kl_full[mask].sum()),
                float(k3.detach()[mask].sum()),
                float(greedy_match.sum()),
                float((mask & greedy_rows.unsqueeze(1)).sum()),
                float(checked.sum()),
            ],
            dtype=torch.float64,
        )
        _world_reduce(maxima, dist.ReduceOp.MAX)
        _world_reduce(sums, dist.ReduceOp.SUM, self.dp_group)
        n_mask = max(sums[1].item(), 1.0)
        out: dict[str, Any] = {
            "logprob_gap_max_sampled": maxima[0].item(),
            "logprob_gap_max_greedy": maxima[1].item(),
            "logprob_gap_max": max(maxima[0].item(), maxima[1].item()),
            "logprob_gap_mean": sums[0].item() / max(sums[7].item(), 1.0),
            "response_tokens": int(sums[1].item()),
            "mask_mismatches": int(sums[2].item()),
            "kl_ref_mean": sums[3].item() / n_mask,
            "kl_ref_max": maxima[2].item(),
            "kl_ref_k3_mean": sums[4].item() / n_mask,
            "greedy_argmax_agreement": sums[5].item() / max(sums[6].item(), 1.0),
        }
        if not update:
            return out

        train_mask = (mask & train_rows).to(self.cdt)
        adv = b["advantages"].to(self.cdt).unsqueeze(1)
        ratio = torch.exp(tok_lp - new_lp)
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * adv)
        per_token = pg + self.kl_coef * k3
        loss = (per_token * train_mask).sum() / max(int(full_n_tokens), 1)
        loss.backward()
        finalize_grads(self.actor, self.actor.config)
        sq = torch.zeros((), dtype=torch.float64)
        for name, p in self.actor.named_parameters():
            if p.grad is not None and self._norm_owner[name]:
                sq += p.grad.detach().to(torch.float64).pow(2).sum()
        grad_norm = float(_world_reduce(sq, dist.ReduceOp.SUM).sqrt())
        scale = min(1.0, self.grad_clip / (grad_norm + 1e-6))
        if scale < 1.0:
            for p in self.actor.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        before = self.snapshot()
        self.optimizer.step()
        changes = torch.tensor(
            [
                max(float((p.detach() - before[n]).abs().max()) for n, p in self.actor.named_parameters()),
                float(sum(bool((p.detach() != before[n]).any()) for n, p in self.actor.named_parameters())),
                float(len(before)),
            ],
            dtype=torch.float64,
        )
        with torch.no_grad():
            after = self.log_probs(self.actor, ids).gather(-1, labels).squeeze(-1)
        shift = torch.tensor([masked_max((after - new_lp).abs(), mask)], dtype=torch.float64)
        loss_t = torch.tensor([float(loss.detach())], dtype=torch.float64)
        _world_reduce(loss_t, dist.ReduceOp.SUM, self.dp_group)
        _world_reduce(shift, dist.ReduceOp.MAX)
        change_max = _world_reduce(changes[:1].clone(), dist.ReduceOp.MAX)
        counts = _world_reduce(changes[1:].clone(), dist.ReduceOp.SUM)
        out.update(
            {
                "loss": loss_t.item(),
                "grad_norm": grad_norm,
                "weights_max_change": change_max.item(),
                "changed_tensors": int(counts[0].item()),
                "local_tensors": int(counts[1].item()),
                "policy_shift_max": shift.item(),
            }
        )
        return out

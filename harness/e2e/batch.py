"""Rollout samples -> the trainer's padded batch, GRPO advantages, and the loss-mask alignment.

A sample is slime's ``Sample`` reduced to what matters here: the token ids (prompt + response, kept as
tokens, never re-tokenized), the token-level loss mask from :func:`gemma4.chat.rollout_loss_mask` (1 on
exactly the tokens the policy generated, stop token included), the engine's generation-time log-probs
and the advantage.

Alignment: the trainer's logits at position ``t`` predict token ``t + 1``, so the per-position mask the
loss uses is the token mask shifted left by one (:func:`logit_mask_from_loss_mask`). The run checks it
against :func:`expected_logit_mask`, built from nothing but the engine's prompt and response lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gemma4.chat import rollout_loss_mask


@dataclass
class Sample:
    """One rollout: ids, loss mask, lengths, generation-time log-probs, reward and advantage."""

    prompt_index: int
    token_ids: list[int]
    loss_mask: list[int]
    prompt_length: int
    response_length: int
    rollout_logprobs: torch.Tensor  # [response_length]
    greedy: bool
    reward: float = 0.0
    exact_match: float = 0.0
    format_reward: float = 0.0
    advantage: float = 0.0
    finished: bool = False


def make_sample(
    prompt_index: int,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    logprobs: torch.Tensor,
    *,
    greedy: bool,
    finished: bool,
    vocab_size: int,
) -> Sample:
    """A sample with slime's token-in/token-out mask (the response is one ``model`` span)."""
    mask = rollout_loss_mask(list(prompt_ids), [("model", list(response_ids))], vocab_size=vocab_size)
    return Sample(
        prompt_index=prompt_index,
        token_ids=mask.token_ids,
        loss_mask=mask.loss_mask,
        prompt_length=mask.prompt_length,
        response_length=mask.response_length,
        rollout_logprobs=logprobs,
        greedy=greedy,
        finished=finished,
    )


def grpo_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """GRPO: ``(r - mean) / (std + eps)`` within one prompt's group (population std; all-equal -> 0)."""
    r = torch.tensor(list(rewards), dtype=torch.float64)
    if r.numel() < 2:
        return [0.0] * r.numel()
    centered = r - r.mean()
    return (centered / (r.std(unbiased=False) + eps)).tolist()


def pack(
    samples: Sequence[Sample], pad_id: int, multiple: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a rollout batch (length rounded up to ``multiple``, for sequence parallel).

    ``rollout_logprobs`` is ``[N, S - 1]`` on the trainer's logit positions (NaN where nothing was
    generated); ``train`` marks the rows that enter the loss (sampled rows; greedy rows are evaluated only).
    """
    n = len(samples)
    length = max(len(s.token_ids) for s in samples)
    length = -(-length // multiple) * multiple
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.long)
    rollout_lp = torch.full((n, length - 1), float("nan"), dtype=dtype)
    for i, s in enumerate(samples):
        ids[i, : len(s.token_ids)] = torch.tensor(s.token_ids)
        loss_mask[i, : len(s.loss_mask)] = torch.tensor(s.loss_mask)
        start = s.prompt_length - 1
        rollout_lp[i, start : start + s.response_length] = s.rollout_logprobs.to(dtype)
    return {
        "input_ids": ids,
        "loss_mask": loss_mask,
        "prompt_length": torch.tensor([s.prompt_length for s in samples], dtype=torch.long),
        "response_length": torch.tensor([s.response_length for s in samples], dtype=torch.long),
        "rollout_logprobs": rollout_lp,
        "advantages": torch.tensor([s.advantage for s in samples], dtype=dtype),
        "train": torch.tensor([not s.greedy for s in samples], dtype=torch.bool),
    }


def logit_mask_from_loss_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-level mask ``[N, S]`` -> mask on logit positions ``[N, S - 1]`` (position t predicts t + 1)."""
    return loss_mask[:, 1:].bool()


def expected_logit_mask(
    prompt_length: torch.Tensor, response_length: torch.Tensor, length: int
) -> torch.Tensor:
    """Ground truth from the engine's lengths: logit positions ``[P - 1, P - 1 + R)`` of each row."""
    pos = torch.arange(length - 1).unsqueeze(0)
    start = (prompt_length - 1).unsqueeze(1)
    return (pos >= start) & (pos < start + response_length.unsqueeze(1))

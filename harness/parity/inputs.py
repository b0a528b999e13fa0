"""Step 2, the inputs both sides get: seeded token ids, document boundaries, next-token labels, the
padding our side needs under CP / SP, and the loss both sides backpropagate."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from gemma4.config import Gemma4TextSpec
from harness.parity.layout import RunLayout


def make_inputs(spec: Gemma4TextSpec, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded random token ids ``[batch, seq_len]``."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, spec.vocab_size, (batch, seq_len), generator=gen)


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    """``[0, L1, L1 + L2, ...]`` as int32 (Megatron's ``cu_seqlens``)."""
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def next_token_labels(ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Next token within the same document; -100 on each document's last token."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    for end in cu[1:].tolist():
        labels[:, end - 1] = -100
    return labels


@dataclass(frozen=True)
class SequencePadding:
    """Our side's input when CP / SP need lengths the real ones are not: each document (each row when
    unpacked) padded at its end, as Megatron/slime pad (``cu_seqlens_*_padded``). Real tokens never see the
    padding (it comes after them in its document), and the comparison keeps only the real positions."""

    ids: torch.Tensor  # [b, S_pad]
    labels: torch.Tensor  # [b, S_pad], -100 on padding and on each document's last real token
    cu_real: torch.Tensor
    cu_padded: torch.Tensor
    real_index: torch.Tensor  # positions of the real tokens in the padded row


def pad_sequences(ids: torch.Tensor, lengths: list[int], layout: RunLayout, pad_id: int) -> SequencePadding:
    """Pad every document to a multiple of ``2·cp`` (CP zig-zag) and the total so each CP rank's tokens
    divide by TP under sequence parallelism."""
    unit = 2 * layout.cp if layout.cp > 1 else 1
    padded = [-(-n // unit) * unit for n in lengths]
    if layout.sequence_parallel:
        while (sum(padded) // layout.cp) % layout.tp:
            padded[-1] += unit
    cu_real = cu_seqlens_of(lengths)
    labels = next_token_labels(ids, cu_real)
    pieces_ids, pieces_labels, index, start = [], [], [], 0
    for (a, b), n_pad in zip(zip(cu_real[:-1].tolist(), cu_real[1:].tolist()), padded):
        extra = n_pad - (b - a)
        pieces_ids += [ids[:, a:b], torch.full((ids.shape[0], extra), pad_id, dtype=ids.dtype)]
        pieces_labels += [labels[:, a:b], torch.full((ids.shape[0], extra), -100, dtype=labels.dtype)]
        index.append(torch.arange(start, start + b - a))
        start += n_pad
    return SequencePadding(
        torch.cat(pieces_ids, dim=1),
        torch.cat(pieces_labels, dim=1),
        cu_real,
        cu_seqlens_of(padded),
        torch.cat(index),
    )


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (computed in fp32, fp64 for fp64 runs), same code for both sides."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, v).to(cdt), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )

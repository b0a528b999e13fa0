"""The ``flash`` attention path (``flash_attn_varlen_func``) on CPU: our reshaping into flash-attn's THD
layout, the ``cu_seqlens`` of packed documents / batch rows and the ``window_size=(W - 1, 0)`` translation,
run against HF's masked attention per document, with the harness's CPU stand-in for flash-attn
(``harness/compat/flash_cpu.py``, itself checked against flash-attn's documented semantics in
``tests/unit/harness/compat/test_flash_cpu.py``) in place of the CUDA kernel.

The path is chosen only on CUDA (``tox -e gpu-parity`` runs it with the real kernel); without this test no CPU
test executes it (issue 17: a mutation in it survived as "no tests"). Catches: the wrong axes transposed into
THD, batch rows not separated in ``cu_seqlens``, packed documents' starts taken from the wrong positions,
the window translated as ``(W, 0)`` (one key too many) or not at all.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from gemma4.model.core_attention import attend
from gemma4.model.sequence_layout import make_layout
from harness.compat import flash_cpu

from .test_attention_paths import hf_attention_per_document  # the HF oracle of that module


@pytest.fixture
def cpu_flash(monkeypatch):
    """``import flash_attn`` yields the CPU stand-in (the only thing swapped; our code runs as on a GPU)."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_cpu.flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)


def _qkv(total: int, np_: int, ng: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, h, d, generator=gen, dtype=torch.float64) for h in (np_, ng, ng)]


@pytest.mark.parametrize("window", [None, 1, 3, 5])
@pytest.mark.parametrize("lengths", [[6, 3, 7], [9]])
def test_flash_path_packed_documents_equal_hf(cpu_flash, lengths, window):
    np_, ng, d = 4, 2, 8
    q, k, v = _qkv(sum(lengths), np_, ng, d, seed=len(lengths) + (window or 0))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    layout = make_layout(sum(lengths), cu_seqlens=cu)
    ours = attend(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), layout, window, backend="flash", scale=1.0)
    ref = hf_attention_per_document(q, k, v, lengths, window)
    assert (ours[:, 0] - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("window", [None, 2])
def test_flash_path_batch_rows_equal_hf(cpu_flash, window):
    """Unpacked ``[s, b, h, d]``: every batch row is its own sequence."""
    s, b, np_, ng, d = 7, 3, 4, 1, 8
    q, k, v = _qkv(s * b, np_, ng, d, seed=3)
    rows = [t.reshape(b, s, -1, d).transpose(0, 1) for t in (q, k, v)]  # [s, b, h, d]
    layout = make_layout(s)
    ours = attend(*rows, layout, window, backend="flash", scale=1.0)  # [s, b, np * d]
    ref = hf_attention_per_document(q, k, v, [s] * b, window)  # rows back to back
    assert (ours.transpose(0, 1).reshape(s * b, -1) - ref).abs().max() <= 1e-12

"""Every attention path equals HF's masked attention, document by document, forward and backward.

Oracle: HF's eager attention (``modeling_gemma4``, softmax cast removed for fp64 as in the exact reference)
with the mask HF's own ``masking_utils`` builds for each document run alone. Ours: the dense and blockwise
paths over a packed row, with every CP rank's zig-zag queries against the keys in global order (what each
rank holds after the all-gather; the gather itself is exercised by the multi-process model tests).
"""

from __future__ import annotations

import types

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma4TextConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from gemma4.model.core_attention import attend
from gemma4.model.sequence_layout import make_layout
from harness.reference import _exact_eager_attention


def hf_attention_per_document(q, k, v, lengths, window):
    """q ``[T, np, d]``, k/v ``[T, ng, d]`` -> ``[T, np * d]`` with HF's eager kernel and masks, per document."""
    np_, ng = q.shape[1], k.shape[1]
    cfg = Gemma4TextConfig(
        vocab_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=np_,
        num_key_value_heads=ng,
        head_dim=q.shape[2],
        sliding_window=window or 1,
        hidden_size_per_layer_input=0,
        layer_types=["full_attention"],
    )
    cfg._attn_implementation = "eager"
    module = types.SimpleNamespace(num_key_value_groups=np_ // ng, head_dim=q.shape[2], training=False)
    outs, start = [], 0
    for n in lengths:
        qd, kd, vd = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, h, n, d]
        embeds = torch.zeros(1, n, 8, dtype=q.dtype)
        pos = torch.arange(n)[None]
        mask_fn = create_sliding_window_causal_mask if window is not None else create_causal_mask
        mask = mask_fn(config=cfg, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=pos)
        out, _ = _exact_eager_attention(module, qd, kd, vd, mask, scaling=1.0)
        outs.append(out.reshape(n, -1))
        start += n
    return torch.cat(outs)


def ours_over_cp_ranks(q, k, v, lengths, window, cp, backend, block):
    """Every CP rank's output on its local queries, scattered back to global order."""
    total = q.shape[0]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out = torch.zeros(total, q.shape[1] * q.shape[2], dtype=q.dtype)
    for rank in range(cp):
        layout = make_layout(total // cp, cu_seqlens=cu, cp_size=cp, cp_rank=rank)
        local_q = q[layout.q_index].unsqueeze(1)  # [s_local, b=1, np, d]
        o = attend(local_q, k.unsqueeze(1), v.unsqueeze(1), layout, window, backend=backend, block=block)
        out = out.index_put((layout.q_index,), o[:, 0])
    return out


@st.composite
def cases(draw):
    cp = draw(st.sampled_from([1, 2, 4]))
    unit = 2 * cp if cp > 1 else 1
    lengths = draw(st.lists(st.integers(1, 12 // unit + 1).map(lambda m: m * unit), min_size=1, max_size=4))
    longest = max(lengths)
    window = draw(
        st.one_of(st.none(), st.integers(1, longest + 3), st.sampled_from([longest, longest - 1 or 1]))
    )
    np_ = draw(st.sampled_from([2, 4]))
    ng = draw(st.sampled_from([d for d in (1, 2, 4) if np_ % d == 0]))
    d = draw(st.sampled_from([4, 8]))
    backend = draw(st.sampled_from(["dense", "blockwise"]))
    block = draw(st.integers(1, 5))
    return cp, lengths, window, np_, ng, d, backend, block


@settings(max_examples=40)
@given(case=cases(), seed=st.integers(0, 1000))
def test_paths_equal_hf_per_document_forward_and_backward(case, seed):
    """Catches: window off by one or missing on a path, windows/positions crossing document boundaries,
    wrong chunk order under CP, keys outside the window in a block, GQA grouping."""
    cp, lengths, window, np_, ng, d, backend, block = case
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, np_, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, ng, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, ng, d, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(total, np_ * d, generator=gen, dtype=torch.float64)

    ref = hf_attention_per_document(q, k, v, lengths, window)
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    ours = ours_over_cp_ranks(q, k, v, lengths, window, cp, backend, block)
    our_grads = torch.autograd.grad((ours * probe).sum(), (q, k, v))

    assert (ours - ref).abs().max() <= 1e-12
    for name, a, b in zip("qkv", our_grads, ref_grads):
        assert (a - b).abs().max() <= 1e-12, f"grad of {name}"


def test_blockwise_uses_linear_memory_worth_of_keys():
    """The blockwise path never looks at keys outside ``[block start - W + 1, block end]``."""
    from gemma4.model import core_attention

    seen = []
    orig = core_attention.eager_attention

    def spy(q, k, v, allowed, scale, dropout_p=0.0):
        seen.append((q.shape[2], k.shape[2]))
        return orig(q, k, v, allowed, scale, dropout_p)

    core_attention.eager_attention = spy
    try:
        layout = make_layout(64)
        x = torch.randn(64, 1, 2, 4, dtype=torch.float64)
        attend(x, x[:, :, :1], x[:, :, :1], layout, 5, backend="blockwise", block=8)
    finally:
        core_attention.eager_attention = orig
    assert seen and all(keys <= queries + 5 - 1 for queries, keys in seen)
    assert sum(q for q, _ in seen) == 64

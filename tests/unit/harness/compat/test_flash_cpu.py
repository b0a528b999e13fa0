"""flash_cpu against a direct masked softmax, per document, for random documents and windows."""

from __future__ import annotations

import pytest
import torch

from harness.compat.flash_cpu import flash_attn_varlen_func, window_mask


def _direct(q, k, v, cu, scale, left, right, causal, softcap=0.0):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for d in range(len(cu) - 1):
        s, e = int(cu[d]), int(cu[d + 1])
        for h in range(q.shape[1]):
            for i in range(e - s):
                logits = []
                for j in range(e - s):
                    ok = (
                        (not causal or j <= i)
                        and (left < 0 or j >= i - left)
                        and (causal or right < 0 or j <= i + right)
                    )
                    sc = float(q[s + i, h].double() @ k[s + j, h // rep].double()) * scale
                    if softcap:
                        sc = softcap * torch.tanh(torch.tensor(sc / softcap, dtype=torch.float64)).item()
                    logits.append(sc if ok else float("-inf"))
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                out[s + i, h] = p @ v[s:e, h // rep].double()
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_direct_masked_softmax(seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 9, (3,), generator=g).tolist()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t, hq, hk, d = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk))
    left = int(torch.randint(-1, 6, (1,), generator=g))
    causal = bool(seed % 2 == 0)
    right = 0 if causal else int(torch.randint(-1, 4, (1,), generator=g))
    softcap = 0.0 if seed < 2 else 5.0
    got = flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max(lens),
        max(lens),
        softmax_scale=0.3,
        causal=causal,
        window_size=(left, right),
        softcap=softcap,
    )
    torch.testing.assert_close(
        got, _direct(q, k, v, cu, 0.3, left, right, causal, softcap), rtol=0, atol=1e-12
    )


def test_window_rule_matches_hf_sliding():
    # HF: key j visible to query i iff 0 <= i - j < W; flash: window (W-1, 0) + causal.
    w = 3
    m = window_mask(7, 7, causal=True, window_size=(w - 1, 0))
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    assert torch.equal(m, (i - j >= 0) & (i - j < w))


def test_bottom_right_alignment_and_fp32():
    m = window_mask(2, 4, causal=True, window_size=(-1, -1))
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    q = torch.randn(4, 2, 4)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, causal=True)
    assert out.dtype == torch.float32 and out.shape == (4, 2, 4)

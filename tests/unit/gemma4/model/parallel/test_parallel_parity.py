"""Whole-model parity for packed rows, context and tensor parallelism (forked gloo ranks) against HF.

Every layout must equal HF (fp64 exact reference: logits, all activations, every parameter's gradient
<= 1e-9; fp32 <= 5e-5) and the single-process unpacked run. The reference never shards: it runs the whole
sequence, and a packed row one document at a time.
"""

from __future__ import annotations

import pytest
import torch

import gemma4.model.core_attention as core_attention
import gemma4.model.gpt_model as gpt_model
import gemma4.model.sequence_layout as sequence_layout
import gemma4.parallel as parallel
from harness.parity import RunLayout, resolve_source, run_parity

pytestmark = pytest.mark.xdist_group("multiprocess")  # one worker forks them, so they do not oversubscribe

LAYOUTS = [
    RunLayout(packed=(8, 12, 4)),
    RunLayout(cp=2),
    RunLayout(cp=4),
    RunLayout(tp=2),
    RunLayout(tp=2, sequence_parallel=True),
    RunLayout(cp=2, packed=(8, 12, 4)),
    RunLayout(tp=2, cp=2, sequence_parallel=True, packed=(8, 16)),
]


def _explain(r):
    return f"{r['layout']['name']}: first divergence {r['first_divergence']}; {r['failures']}"


@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-12b"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_layout_fp64_forward_and_gradients(preset, layout):
    """tiny-31b/12b have one global KV head, so TP 2 also covers KV-head replication on K=V layers."""
    src = resolve_source(preset=preset)
    result = run_parity(src, torch.float64, grads=True, layout=layout)
    assert result["pass"], _explain(result)
    assert result["metrics"]["grads_max_scaled"] <= 1e-9
    if not layout.packed:  # also equal to our own single-process run
        single = run_parity(src, torch.float64, layout=RunLayout())
        diff = (result.tensors.megatron_logits - single.tensors.megatron_logits).abs().max()
        assert float(diff) <= 1e-9


@pytest.mark.parametrize(
    "layout",
    [RunLayout(cp=2, packed=(8, 12, 4)), RunLayout(tp=2, sequence_parallel=True)],
    ids=lambda lay: lay.name,
)
def test_layout_fp32(layout):
    result = run_parity(resolve_source(preset="tiny-31b"), torch.float32, layout=layout)
    assert result["pass"], _explain(result)
    assert result["metrics"]["logits"]["max_abs"] <= 5e-5


def test_windows_and_positions_across_long_documents_bf16():
    """Documents longer than the window, packed: HF runs each alone; bf16 shows any RoPE position drift."""
    result = run_parity(
        resolve_source(preset="tiny-31b"), torch.bfloat16, layout=RunLayout(packed=(40, 56, 24))
    )
    assert result["pass"], _explain(result)


# ---- planted bugs ----------------------------------------------------------------------------------------


def window_only_in_packed_path(mp):
    orig = core_attention.attend
    mp.setattr(
        core_attention,
        "attend",
        lambda q, k, v, layout, window, **kw: orig(q, k, v, layout, window if layout.packed else None, **kw),
    )


def documents_not_separated(mp):
    orig = sequence_layout.make_layout

    def make_layout(*args, **kwargs):
        lay = orig(*args, **kwargs)
        lay.q_pos, lay.k_pos = lay.q_index.clone(), torch.arange(lay.k_pos.numel())
        lay.q_doc, lay.k_doc = torch.zeros_like(lay.q_doc), torch.zeros_like(lay.k_doc)
        return lay

    # Documents leak into each other (one long causal sequence) and RoPE runs on absolute positions.
    mp.setattr(gpt_model, "make_layout", make_layout)


def zigzag_chunk_order_wrong(mp):
    """The model assumes chunks (2cp-1-r, r) while the data (sharded like slime) holds (r, 2cp-1-r)."""
    orig = sequence_layout.make_layout

    def make_layout(*args, **kwargs):
        lay = orig(*args, **kwargs)
        if lay.cp_size > 1:
            half = lay.q_index.numel() // 2
            swap = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
            lay.q_index, lay.q_doc, lay.q_pos = lay.q_index[swap], lay.q_doc[swap], lay.q_pos[swap]
        return lay

    mp.setattr(gpt_model, "make_layout", make_layout)


def kv_gather_rank_order_wrong(mp):
    orig = sequence_layout.make_layout

    def make_layout(*args, **kwargs):
        lay = orig(*args, **kwargs)
        lay.gather_order = torch.arange(lay.gather_order.numel())  # rank-major order taken as global order
        return lay

    mp.setattr(gpt_model, "make_layout", make_layout)


def kv_tp_split_wrong(mp):
    """K=V linear_qkv split over TP by strided rows instead of Megatron's contiguous slices."""
    orig = parallel.load_full_state_dict

    def load(model, full, tp_rank, tp_size, *ep):
        orig(model, full, tp_rank, tp_size, *ep)
        for name, p in model.named_parameters():
            if name.endswith("linear_qkv.weight") and p.shape[0] * tp_size == full[name].shape[0]:
                layer = model.decoder.layers[int(name.split(".")[2])]
                if layer.self_attention.k_eq_v:
                    with torch.no_grad():
                        p.copy_(full[name][tp_rank::tp_size])

    mp.setattr(parallel, "load_full_state_dict", load)


MUTANTS = [
    (window_only_in_packed_path, RunLayout(), torch.float64, "layer 0 (sliding_attention) attention"),
    (
        documents_not_separated,
        RunLayout(packed=(8, 12, 4)),
        torch.float64,
        "layer 0 (sliding_attention) attention",
    ),
    (zigzag_chunk_order_wrong, RunLayout(cp=2), torch.float64, "layer 0 (sliding_attention) attention"),
    (kv_gather_rank_order_wrong, RunLayout(cp=2), torch.float64, "layer 0 (sliding_attention) attention"),
    (kv_tp_split_wrong, RunLayout(tp=2), torch.float64, "layer 3 (full_attention) attention"),
]


@pytest.mark.parametrize(
    "case", MUTANTS, ids=[f"{m.__name__}-{lay.name}-{str(d)[6:]}" for m, lay, d, _ in MUTANTS]
)
def test_planted_parallel_bug_turns_parity_red(monkeypatch, case):
    mutant, layout, dtype, where = case
    mutant(monkeypatch)
    result = run_parity(resolve_source(preset="tiny-31b"), dtype, layout=layout)
    assert not result["pass"], f"{mutant.__name__} was not detected under {layout.name}: {result['metrics']}"
    assert result["first_divergence"] == where, result["failures"]


ODD = [
    (RunLayout(tp=2), 24),
    (RunLayout(cp=2), 10),
    (RunLayout(cp=2, packed=(5, 7, 3)), 0),
    (RunLayout(tp=2, sequence_parallel=True), 11),
    (RunLayout(tp=2, cp=2, sequence_parallel=True, packed=(5, 9)), 0),
]


@pytest.mark.parametrize("case", ODD, ids=[f"{lay.name}-s{s}" for lay, s in ODD])
def test_sizes_that_do_not_divide(case):
    """Odd vocabulary (257) and MLP width (81) under TP are zero-padded like Megatron pads the vocabulary;
    lengths that do not divide by 2*cp (or by TP under SP) are padded per document like slime pads them.
    Only real tokens and real vocabulary entries are compared, and the gradients of the padding are zero."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from harness.parity import ParitySource
    from harness.presets import preset_config_dict

    layout, seq_len = case
    cfg = hf_text_config_from_any(
        preset_config_dict("tiny-12b") | {"vocab_size": 257, "intermediate_size": 81}
    )
    src = ParitySource("odd-sizes", cfg, text_spec_from_hf(cfg))
    result = run_parity(src, torch.float64, grads=True, layout=layout, seq_len=seq_len or 24)
    assert result["pass"], _explain(result)
    assert result.tensors.megatron_logits.shape[-1] == 257

"""``gemma4-harness convert``: bit-exact round trips, loadable outputs, equal logits, and every refusal.

Checkpoints are written by transformers' ``save_pretrained`` and compared with the ``safetensors`` library,
so neither side of a check is our own reader.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gemma4.config import text_spec_from_any
from gemma4.conversion import sharding
from gemma4.conversion.mcore_io import MANIFEST, plan
from gemma4.errors import InvalidInputError
from harness.cli import main
from harness.presets import PRESETS, preset_config_dict
from harness.strategies import dense_configs, moe_configs
from harness.testing.conversion import (
    logits_failures,
    roundtrip_failures,
    save_hf_checkpoint,
    state_dict_failures,
    stored_tensors,
    text_relative,
)

#: The CLI's one-line refusal: ``gemma4-harness convert[ <direction>]: error: ...``.
ONE_LINE_ERROR = re.compile(r"gemma4-harness convert( [a-z-]+)?: error: ")
REPO = Path(__file__).resolve().parents[4]


def tp2_variant(name: str) -> dict:
    """A preset with two global KV heads, so that every layer splits over two TP ranks."""
    return preset_config_dict(name) | {"num_global_key_value_heads": 2}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop whatever building the fixtures printed
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


# ---- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_roundtrip_presets_bit_exact_tp1(tmp_path, name, dtype):
    """Same keys, shapes, dtypes and bytes after HF -> Megatron -> HF (safetensors-library oracle)."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict(name), dtype, seed=1)
    assert roundtrip_failures(hf, tmp_path) == []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_roundtrip_presets_at_tp2(tmp_path, capsys, name):
    """Every preset at TP 2, including one global KV head over two ranks (rows split, groups replicated)."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict(name), torch.bfloat16)
    assert roundtrip_failures(hf, tmp_path, tp=2) == []
    rc, out, _ = run(["convert", "roundtrip", "--hf", str(hf), "--tp", "2"], capsys)
    assert rc == 0 and "bit-exact" in out and out.rstrip().endswith("PASS")


@pytest.mark.parametrize("tp, ep", [(1, 2), (1, 4), (2, 2), (1, 8)])
def test_roundtrip_moe_expert_parallel(tmp_path, tp, ep):
    """26B-A4B-style MoE: experts placed on EP ranks (mp_rank_{tp}_{ep}), TP-split as GLU/row, bit-exact."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-26b-a4b"), torch.bfloat16, seed=7)
    assert roundtrip_failures(hf, tmp_path, tp=tp, ep=ep) == []
    mc = tmp_path / f"mcore-safetensors-tp{tp}-ep{ep}"
    assert sorted(p.name for p in mc.iterdir() if p.is_dir()) == [
        f"mp_rank_{t:02d}_{e:03d}" for t in range(tp) for e in range(ep)
    ]
    local = load_file(mc / f"mp_rank_00_{ep - 1:03d}" / "model.safetensors")
    per = 8 // ep
    assert {k for k in local if ".local_experts." in k and k.startswith("decoder.layers.0.")} == {
        f"decoder.layers.0.mlp.experts.local_experts.{i}.linear_fc{j}.weight"
        for i in range(per)
        for j in (1, 2)
    }
    hf_gate_up = load_file(hf / "model.safetensors")["model.layers.0.experts.gate_up_proj"]
    first = (ep - 1) * per  # EP rank ep-1 holds global experts [(ep-1)*E/ep, ...) as local 0..
    if tp == 1:
        got = local["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
        assert torch.equal(got, hf_gate_up[first])


@given(
    cfg=dense_configs(), tp=st.sampled_from([1, 2, 4]), dtype=st.sampled_from([torch.float32, torch.bfloat16])
)
@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_roundtrip_random_configs(tmp_path_factory, cfg, tp, dtype):
    """Configs nobody tuned for: irregular layer types, untied heads, K=V on/off, odd vocab sizes."""
    work = tmp_path_factory.mktemp("rt")
    hf = save_hf_checkpoint(work / "hf", cfg, dtype, seed=2)
    try:
        sharding.check_tp(text_spec_from_any(cfg), tp)
    except InvalidInputError:
        tp = 1
    assert roundtrip_failures(hf, work, tp=tp) == []


@given(cfg=moe_configs(), ep=st.sampled_from([1, 2, 4]))
@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_roundtrip_random_moe_configs(tmp_path_factory, cfg, ep):
    work = tmp_path_factory.mktemp("rt-moe")
    hf = save_hf_checkpoint(work / "hf", cfg, torch.bfloat16, seed=3)
    ep = ep if cfg["num_experts"] % ep == 0 else 1
    assert roundtrip_failures(hf, work, ep=ep) == []


def test_roundtrip_conditional_generation_sharded(tmp_path, capsys):
    """``model.language_model.*`` names, sharded with an index, a vision tensor skipped with a note."""
    hf = save_hf_checkpoint(tmp_path / "cg", tp2_variant("tiny-31b"), conditional_generation=True, shards=3)
    assert roundtrip_failures(hf, tmp_path, tp=2) == []
    rc, out, _ = run(["convert", "roundtrip", "--hf", str(hf), "--tp", "2"], capsys)
    assert rc == 0 and "skipped 1 non-text tensors" in out and "model.language_model." in out


def test_roundtrip_untied_float16(tmp_path):
    cfg = tp2_variant("tiny-12b") | {"tie_word_embeddings": False}
    hf = save_hf_checkpoint(tmp_path / "hf", cfg, torch.float16)
    assert "lm_head.weight" in stored_tensors(hf)
    assert roundtrip_failures(hf, tmp_path, tp=2) == []


def test_roundtrip_reports_differences_with_exit_1(tmp_path, capsys, monkeypatch):
    """The round-trip command itself can fail: a one-sided export bug (fc1 halves swapped) exits 1."""
    import gemma4.conversion.mapping as mapping

    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    orig = mapping.rule_to_hf

    def swapped(rule, w, spec, layer):
        out = orig(rule, w, spec, layer)
        return [(out[0][0], out[1][1]), (out[1][0], out[0][1])] if rule.kind == "fc1" else out

    monkeypatch.setattr(mapping, "rule_to_hf", swapped)
    rc, out, _ = run(["convert", "roundtrip", "--hf", str(hf), "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 1 and "gate_proj.weight': values differ" in out and out.rstrip().endswith("FAIL")
    assert json.loads((tmp_path / "r.json").read_text())["identical"] is False


# ---- outputs are usable -----------------------------------------------------------------------------


def test_export_loads_with_from_pretrained(tmp_path, capsys):
    """The exported directory is a Gemma4ForCausalLM checkpoint transformers loads strictly."""
    from transformers import Gemma4ForCausalLM

    hf = save_hf_checkpoint(
        tmp_path / "cg", preset_config_dict("tiny-31b"), torch.bfloat16, conditional_generation=True
    )
    assert run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc")], capsys)[0] == 0
    assert (
        run(
            ["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "out")],
            capsys,
        )[0]
        == 0
    )
    model, info = Gemma4ForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16
    loaded = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    want = {"model." + k: v for k, v in text_relative(stored_tensors(hf)).items()}
    assert state_dict_failures(loaded, want) == []


@pytest.mark.parametrize(
    "name, dtype",
    [("tiny-31b", torch.float32), ("tiny-12b", torch.bfloat16), ("tiny-26b-a4b", torch.float32)],
)
def test_converted_megatron_model_logits_equal_hf(tmp_path, capsys, name, dtype):
    """build_gemma4_model at TP 1 loads the converted checkpoint; its logits equal HF's on the source."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict(name), dtype, seed=5)
    assert run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc")], capsys)[0] == 0
    assert logits_failures(hf, tmp_path / "mc") == []


def test_tp2_rank_files_hold_each_ranks_state_dict(tmp_path, capsys):
    """mp_rank_00/01 hold Megatron names with TP-local shapes; the manifest records the layout."""
    cfg = tp2_variant("tiny-31b") | {"tie_word_embeddings": False}
    hf = save_hf_checkpoint(tmp_path / "hf", cfg)
    assert (
        run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2"], capsys)[
            0
        ]
        == 0
    )
    manifest = json.loads((tmp_path / "mc" / MANIFEST).read_text())
    assert manifest["tensor_model_parallel_size"] == 2 and manifest["dtype"] == "float32"
    assert sorted(p.name for p in (tmp_path / "mc").iterdir()) == [MANIFEST, "mp_rank_00", "mp_rank_01"]
    spec = text_spec_from_any(cfg)
    layout = plan(spec, torch.float32, 2, 1)
    for r in (0, 1):
        got = load_file(tmp_path / "mc" / f"mp_rank_0{r}" / "model.safetensors")
        assert {k: tuple(v.shape) for k, v in got.items()} == {e.name: e.shape for e in layout[(r, 0)]}
    emb0 = load_file(tmp_path / "mc" / "mp_rank_00" / "model.safetensors")["embedding.word_embeddings.weight"]
    assert emb0.shape == (spec.vocab_size // 2, spec.hidden_size)


# ---- tolerated oddities -----------------------------------------------------------------------------


def _rewrite(path: Path, fn) -> None:
    t = load_file(path)
    fn(t)
    save_file(t, path)


def test_saved_tied_head_and_synthesised_v_are_dropped_with_notes(tmp_path, capsys):
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-31b"))

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.3.self_attn.v_proj.weight"] = t["model.layers.3.self_attn.k_proj.weight"].clone()

    _rewrite(hf / "model.safetensors", add)
    rc, out, _ = run(["convert", "roundtrip", "--hf", str(hf)], capsys)
    assert rc == 0, out
    assert "identical to the tied embedding" in out and "synthesised v_proj of K=V layer 3" in out


def test_dead_kv_weights_of_kv_shared_layers_are_dropped(tmp_path, capsys):
    """Released E2B/E4B checkpoints carry k_proj/v_proj/k_norm on KV-shared layers that nothing reads:
    accepted, dropped with a note, never exported; everything else round-trips bit-exact."""
    cfg = preset_config_dict("tiny-e2b")
    spec = text_spec_from_any(cfg)
    hf = save_hf_checkpoint(tmp_path / "hf", cfg, torch.bfloat16, seed=8)
    reuse = [i for i in range(spec.num_layers) if spec.reuses_kv(i)]
    assert reuse
    dead = []

    def add(t):
        for i in reuse:
            d, n = spec.head_dims[i], spec.num_kv_heads[i]
            for proj in ("k_proj", "v_proj"):
                key = f"model.layers.{i}.self_attn.{proj}.weight"
                t[key] = torch.randn(n * d, spec.hidden_size).to(torch.bfloat16)
                dead.append(key)
            t[f"model.layers.{i}.self_attn.k_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
            dead.append(f"model.layers.{i}.self_attn.k_norm.weight")

    _rewrite(hf / "model.safetensors", add)
    rc, out, _ = run(["convert", "roundtrip", "--hf", str(hf)], capsys)
    assert rc == 0 and f"dropped {len(dead)} unused k_proj/v_proj/k_norm tensors of KV-shared layers" in out
    assert run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc")], capsys)[0] == 0
    assert (
        run(
            ["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "o")], capsys
        )[0]
        == 0
    )
    src = {k: v for k, v in stored_tensors(hf).items() if k not in dead}
    assert state_dict_failures(stored_tensors(tmp_path / "o"), src) == []


# ---- refusals ---------------------------------------------------------------------------------------


def _break_hf(ckpt: Path, how: str) -> list[str]:
    """Break a checkpoint; return the strings the error message must contain."""
    f = ckpt / "model.safetensors"
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "missing":
        _rewrite(f, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
        return [str(ckpt), "'model.layers.1.self_attn.q_proj.weight' is missing"]
    if how == "unexpected":
        _rewrite(f, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(1)))
        return [str(f), "'model.layers.0.self_attn.extra.weight' is unexpected"]
    if how == "shape":
        _rewrite(f, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3)))
        return [str(f), "'model.layers.0.mlp.up_proj.weight' has shape [3, 3]"]
    if how == "dtype":
        key = "model.layers.2.self_attn.o_proj.weight"
        _rewrite(f, lambda t: t.__setitem__(key, t[key].half()))
        return [str(f), f"{key!r} has dtype float16", "float32"]
    if how == "config-fewer-layers":
        cfg["num_hidden_layers"] = 6
        cfg["layer_types"] = cfg["layer_types"][:5] + ["full_attention"]
        plc = cfg["per_layer_config"]
        cfg["per_layer_config"] = {"2": plc["2"], "5": plc["6"]}
        cfg_path.write_text(json.dumps(cfg))
        # layer 5 turns from sliding into a K=V full layer: its stored v_proj no longer fits
        return [str(f), "'model.layers.5.self_attn.v_proj.weight' is unexpected"]
    if how == "config-more-layers":
        cfg["num_hidden_layers"] = 8
        cfg["layer_types"] = cfg["layer_types"] + ["full_attention"]
        cfg["per_layer_config"]["7"] = cfg["per_layer_config"]["6"]
        cfg_path.write_text(json.dumps(cfg))
        return [str(ckpt), "'model.layers.7.input_layernorm.weight' is missing", "declares 8 layers"]
    if how == "config-wider-mlp":
        cfg["intermediate_size"] = 96
        cfg_path.write_text(json.dumps(cfg))
        return [
            str(f),
            "'model.layers.0.mlp.gate_proj.weight' has shape [160, 48]; config.json implies [96, 48]",
        ]
    if how == "tied-head-differs":
        _rewrite(
            f, lambda t: t.__setitem__("lm_head.weight", torch.randn_like(t["model.embed_tokens.weight"]))
        )
        return [str(f), "'lm_head.weight' differs", "tie_word_embeddings"]
    if how == "v-proj-on-k-eq-v-layer":
        key = "model.layers.2.self_attn.v_proj.weight"
        _rewrite(
            f, lambda t: t.__setitem__(key, torch.randn_like(t["model.layers.2.self_attn.k_proj.weight"]))
        )
        return [str(f), f"{key!r} is unexpected", "K=V"]
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
        return [str(f), "truncated", "tensor 'model."]
    if how == "corrupted-header":
        raw = bytearray(f.read_bytes())
        raw[10:14] = b"\xff\xfe\x00!"
        f.write_bytes(bytes(raw))
        return [str(f), "corrupted safetensors header"]
    if how == "unreadable-index":
        (ckpt / "model.safetensors.index.json").write_text("{ not json")
        return [str(ckpt / "model.safetensors.index.json"), "unreadable"]
    if how == "no-config":
        cfg_path.unlink()
        return [str(cfg_path), "not found"]
    if how == "bad-config":
        cfg["hidden_activation"] = "relu"
        cfg_path.write_text(json.dumps(cfg))
        return [str(cfg_path), "hidden_activation"]
    raise AssertionError(how)


HF_BREAKS = [
    "missing",
    "unexpected",
    "shape",
    "dtype",
    "config-fewer-layers",
    "config-more-layers",
    "config-wider-mlp",
    "tied-head-differs",
    "v-proj-on-k-eq-v-layer",
    "truncated",
    "corrupted-header",
    "unreadable-index",
    "no-config",
    "bad-config",
]


def _assert_refused(rc: int, err: str, needles: list[str], out: Path, one_line: bool = True) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    if one_line:
        assert err.count("\n") == 1 and ONE_LINE_ERROR.match(err), err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists() or not any(out.iterdir()), "partial output left behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")], (
        "temp dir left behind"
    )


@pytest.mark.parametrize("how", HF_BREAKS)
@pytest.mark.parametrize("command", ["hf-to-mcore", "roundtrip"])
def test_bad_hf_checkpoint_exits_2_naming_file_and_tensor(tmp_path, capsys, how, command):
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"), seed=4)
    needles = _break_hf(hf, how)
    out = tmp_path / "mc"
    argv = ["convert", command, "--hf", str(hf)] + (["--out", str(out)] if command == "hf-to-mcore" else [])
    rc, _, err = run(argv, capsys)
    _assert_refused(rc, err, needles, out)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--ep", "2"], ["--ep 2", "dense model"]),
        (["--tp", "3"], ["--tp 3: layer 0 (sliding_attention) has 2 KV heads"]),
        (["--tp", "0"], ["--tp must be a positive integer"]),
    ],
)
def test_bad_parallel_sizes_exit_2(tmp_path, capsys, extra, needles):
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    out = tmp_path / "mc"
    rc, _, err = run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)] + extra, capsys)
    _assert_refused(rc, err, needles, out)


def test_argparse_errors_exit_2(tmp_path, capsys):
    rc, _, err = run(["convert", "hf-to-mcore", "--hf", "x", "--out", "y", "--tp", "two"], capsys)
    assert rc == 2 and "--tp" in err and "Traceback" not in err
    rc, _, err = run(["convert", "sideways"], capsys)
    assert rc == 2 and "invalid choice" in err


def test_non_empty_output_directory_is_refused_and_kept(tmp_path, capsys):
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    out = tmp_path / "mc"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)], capsys)
    assert rc == 2 and f"--out {out}: output directory is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(empty)], capsys)[0] == 0
    rc, _, err = run(["convert", "mcore-to-hf", "--mcore", str(empty), "--out", str(hf)], capsys)
    assert rc == 2 and "output directory is not empty" in err


def _break_mcore(mc: Path, how: str) -> list[str]:
    r0, r1 = mc / "mp_rank_00" / "model.safetensors", mc / "mp_rank_01" / "model.safetensors"
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    if how == "no-manifest":
        (mc / MANIFEST).unlink()
        return [str(mc / MANIFEST), "manifest not found"]
    if how == "corrupt-manifest":
        (mc / MANIFEST).write_text("{")
        return [str(mc / MANIFEST), "unreadable manifest"]
    if how == "manifest-wrong-tp":
        m = json.loads((mc / MANIFEST).read_text())
        m["tensor_model_parallel_size"] = 3
        (mc / MANIFEST).write_text(json.dumps(m))
        return [str(mc / MANIFEST), "--tp 3"]
    if how == "missing-rank-tensor":
        _rewrite(r1, lambda t: t.pop(qkv))
        return [str(mc / "mp_rank_01"), f"{qkv!r} is missing"]
    if how == "unexpected-rank-tensor":
        _rewrite(r0, lambda t: t.__setitem__("decoder.layers.1.extra", torch.zeros(1)))
        return [str(r0), "unexpected tensor 'decoder.layers.1.extra'"]
    if how == "rank-shape":
        _rewrite(r1, lambda t: t.__setitem__(qkv, torch.zeros(2, 2)))
        return [str(r1), f"{qkv!r} has shape [2, 2]"]
    if how == "rank-dtype":
        _rewrite(r0, lambda t: t.__setitem__(qkv, t[qkv].double()))
        return [str(r0), f"{qkv!r} has dtype float64"]
    if how == "rank-truncated":
        r1.write_bytes(r1.read_bytes()[:-10])
        return [str(r1), "truncated"]
    if how == "replicas-disagree":
        key = "decoder.layers.0.input_layernorm.weight"
        _rewrite(r1, lambda t: t.__setitem__(key, t[key] + 1))
        return [f"{key!r} is replicated", "rank 1 differs"]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "no-manifest",
        "corrupt-manifest",
        "manifest-wrong-tp",
        "missing-rank-tensor",
        "unexpected-rank-tensor",
        "rank-shape",
        "rank-dtype",
        "rank-truncated",
        "replicas-disagree",
    ],
)
def test_bad_megatron_checkpoint_exits_2(tmp_path, capsys, how):
    hf = save_hf_checkpoint(tmp_path / "hf", tp2_variant("tiny-12b"))
    mc = tmp_path / "mc"
    assert run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--tp", "2"], capsys)[0] == 0
    needles = _break_mcore(mc, how)
    out = tmp_path / "back"
    rc, _, err = run(["convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(out)], capsys)
    _assert_refused(rc, err, needles, out)


def test_cli_subprocess_exit_codes(tmp_path):
    """A fresh interpreter: exit 0 on a good round trip, exit 2 with one line and no traceback on bad input."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = (
        "import sys; from harness.cli import main\n"
        f"a = main(['convert', 'roundtrip', '--hf', {str(hf)!r}])\n"
        f"b = main(['convert', 'hf-to-mcore', '--hf', {str(hf)!r}, '--out', {str(tmp_path / 'mc')!r}, '--ep', '2'])\n"
        "sys.exit(10 * a + b)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "--ep 2" in proc.stderr
    assert not (tmp_path / "mc").exists()


def test_manifest_records_where_the_weights_came_from(tmp_path):
    """The manifest's ``source`` record (provenance a user reads to know what a checkpoint was made from):
    the HF directory, the prefix the text weights had, how many non-text tensors were skipped, the notes and
    the versions. Catches a renamed or dropped field (issue 17: a renamed ``skipped_non_text_tensors``
    survived)."""
    from gemma4.conversion.convert import hf_to_mcore_dir

    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"), conditional_generation=True)
    hf_to_mcore_dir(hf, tmp_path / "out")
    source = json.loads((tmp_path / "out" / MANIFEST).read_text())["source"]
    assert set(source) == {"hf_dir", "hf_prefix", "skipped_non_text_tensors", "notes", "versions"}
    assert source["hf_dir"] == str(hf.resolve()) and source["hf_prefix"] == "model.language_model."
    assert source["skipped_non_text_tensors"] == 1 and any("skipped 1" in n for n in source["notes"])
    assert {"torch", "transformers"} <= set(source["versions"])


def test_unknown_format_through_the_python_api_names_the_flag(tmp_path):
    """argparse guards ``--format`` on the command line; the Python entry point must refuse by itself."""
    from gemma4.conversion.convert import hf_to_mcore_dir

    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    with pytest.raises(InvalidInputError, match=r"--format must be one of \['safetensors', 'torch_dist'\]"):
        hf_to_mcore_dir(hf, tmp_path / "out", fmt="zarr")
    assert not (tmp_path / "out").exists()

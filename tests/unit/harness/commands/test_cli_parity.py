"""The ``gemma4-harness parity`` contract: exit codes, JSON, dumps, HF checkpoint layouts, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4.model.gpt_model as gpt_model
from gemma4.config import hf_text_config_from_any
from harness.cli import main
from harness.presets import preset_config_dict
from harness.reference import build_reference_model

REPO = Path(__file__).resolve().parents[4]


def _save_causal_lm(directory: Path, preset: str = "tiny-12b", **changes) -> dict:
    """A Gemma4ForCausalLM checkpoint written by transformers itself (config.json + model.safetensors)."""
    cfg = hf_text_config_from_any(preset_config_dict(preset) | changes)
    model = build_reference_model(cfg, torch.float32, seed=11)
    model.save_pretrained(directory)
    return json.loads((directory / "config.json").read_text())


def _as_conditional_generation(src: Path, dst: Path, shards: int = 2) -> None:
    """Rename to ``model.language_model.*``, add a vision tensor, shard with an index, wrap the config."""
    tensors = load_file(src / "model.safetensors")
    renamed = {"model.language_model." + k[len("model.") :]: v for k, v in tensors.items()}
    renamed["model.vision_tower.patch.weight"] = torch.zeros(2, 2)
    names = sorted(renamed)
    dst.mkdir()
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: renamed[k].contiguous() for k in part}, dst / fname)
        weight_map.update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text}))


def test_preset_json_and_dump(tmp_path, capsys):
    out_json, dump = tmp_path / "r.json", tmp_path / "dump"
    rc = main(
        [
            "parity",
            "--preset",
            "tiny-31b",
            "--grads",
            "--json",
            str(out_json),
            "--dump",
            str(dump),
            "--batch",
            "2",
            "--seq-len",
            "12",
        ]
    )
    assert rc == 0
    assert "PASS" in capsys.readouterr().out
    r = json.loads(out_json.read_text())
    assert r["pass"] is True and r["dtype"] == "float64" and r["first_divergence"] is None
    assert r["metrics"]["logits"]["max_abs"] <= 1e-9 and r["metrics"]["grads_max_scaled"] <= 1e-9
    assert {"max_abs", "max_rel"} <= set(r["metrics"]["logits"]) and "kl_mean" in r["metrics"]
    assert r["tolerance"]["name"] == "fp64-exact-cross-framework"
    ids = load_file(dump / "inputs.safetensors")["input_ids"]
    assert ids.shape == (2, 12)
    for name in ("megatron", "hf"):
        logits = load_file(dump / f"{name}.safetensors")["logits"]
        assert logits.shape == (2, 12, 256) and logits.dtype == torch.float64
    assert not [p for p in dump.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hf_checkpoint_causal_lm(tmp_path, dtype):
    _save_causal_lm(tmp_path / "ckpt")
    assert main(["parity", "--hf-checkpoint", str(tmp_path / "ckpt"), "--dtype", dtype]) == 0


def test_hf_checkpoint_conditional_generation_sharded(tmp_path, capsys):
    """``model.language_model.*`` names, sharded with an index, vision tensors skipped with a note."""
    _save_causal_lm(tmp_path / "ckpt", "tiny-31b")
    _as_conditional_generation(tmp_path / "ckpt", tmp_path / "cg")
    out = tmp_path / "r.json"
    assert main(["parity", "--hf-checkpoint", str(tmp_path / "cg"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert any("model.language_model." in n for n in r["notes"]) and any("skipped 1" in n for n in r["notes"])


def test_hf_checkpoint_uses_its_weights(tmp_path):
    """The checkpoint's weights are used as they are: a zeroed tensor changes HF and Megatron alike."""
    _save_causal_lm(tmp_path / "ckpt")
    base = tmp_path / "a.json"
    assert (
        main(
            [
                "parity",
                "--hf-checkpoint",
                str(tmp_path / "ckpt"),
                "--json",
                str(base),
                "--dump",
                str(tmp_path / "d1"),
            ]
        )
        == 0
    )
    t = load_file(tmp_path / "ckpt" / "model.safetensors")
    t["model.layers.0.mlp.down_proj.weight"] = torch.zeros_like(t["model.layers.0.mlp.down_proj.weight"])
    save_file(t, tmp_path / "ckpt" / "model.safetensors")
    assert main(["parity", "--hf-checkpoint", str(tmp_path / "ckpt"), "--dump", str(tmp_path / "d2")]) == 0
    a = load_file(tmp_path / "d1" / "hf.safetensors")["logits"]
    b = load_file(tmp_path / "d2" / "hf.safetensors")["logits"]
    assert not torch.equal(a, b)


def test_failure_exits_1_and_names_the_divergence(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpt_model, "softcap", lambda logits, cap: logits)
    out = tmp_path / "r.json"
    assert main(["parity", "--preset", "tiny-31b", "--json", str(out)]) == 1
    assert "FAIL: first divergence at logits" in capsys.readouterr().out
    assert json.loads(out.read_text())["pass"] is False


def _break(ckpt: Path, how: str) -> str:
    f = ckpt / "model.safetensors"
    t = load_file(f)
    if how == "missing":
        del t["model.layers.1.self_attn.q_proj.weight"]
        save_file(t, f)
        return "layers.1.self_attn.q_proj.weight"
    if how == "shape":
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
        save_file(t, f)
        return "up_proj"
    if how == "unexpected":
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
        save_file(t, f)
        return "extra.weight"
    if how == "corrupt":
        f.write_bytes(f.read_bytes()[:100])
        return "model.safetensors"
    if how == "no-weights":
        f.unlink()
        return "no safetensors"
    if how == "bad-config":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["hidden_activation"] = "relu"
        (ckpt / "config.json").write_text(json.dumps(cfg))
        return "hidden_activation"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "shape", "unexpected", "corrupt", "no-weights", "bad-config"])
def test_bad_checkpoint_exits_2_naming_the_problem(tmp_path, capsys, how):
    _save_causal_lm(tmp_path / "ckpt")
    needle = _break(tmp_path / "ckpt", how)
    assert main(["parity", "--hf-checkpoint", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["parity", "--preset", "tiny-99b"], "unknown preset"),
        (["parity", "--preset", "tiny-31b", "--dtype", "float16"], "--dtype"),
        (["parity", "--preset", "tiny-31b", "--seq-len", "1"], "--seq-len"),
        (["parity", "--hf-config", "/nonexistent/config.json"], "/nonexistent/config.json"),
        (["parity"], "one of the arguments"),
        (["parity", "--preset", "tiny-31b", "--hf-config", "x.json"], "not allowed with"),
    ],
)
def test_invalid_input_exits_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(main(argv))
    assert exc_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_hf_config_file(tmp_path):
    cfg = preset_config_dict("tiny-12b") | {"sliding_window": 2, "layer_types": ["full_attention"] * 7}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["parity", "--hf-config", str(tmp_path / "config.json"), "--dtype", "float32"]) == 0


def test_module_entry_point_subprocess(tmp_path):
    """``python -m harness`` works end to end in a fresh interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "parity",
            "--preset",
            "tiny-12b",
            "--dtype",
            "float32",
            "--json",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["pass"] is True


def test_released_e_series_checkpoint_with_dead_kv_weights(tmp_path):
    """Released E2B/E4B checkpoints still carry k_proj/v_proj/k_norm on KV-shared layers: accepted, dropped
    with a note, and parity holds (fp64 and fp32)."""
    _save_causal_lm(tmp_path / "ckpt", "tiny-e2b")
    f = tmp_path / "ckpt" / "model.safetensors"
    t = load_file(f)
    gen = torch.Generator().manual_seed(0)
    for layer in range(6, 10):  # the KV-shared layers of tiny-e2b
        d = 32 if layer == 9 else 16
        t[f"model.layers.{layer}.self_attn.k_proj.weight"] = torch.randn(d, 64, generator=gen)
        t[f"model.layers.{layer}.self_attn.v_proj.weight"] = torch.randn(d, 64, generator=gen)
        t[f"model.layers.{layer}.self_attn.k_norm.weight"] = torch.randn(d, generator=gen)
    save_file(t, f)
    out = tmp_path / "r.json"
    assert main(["parity", "--hf-checkpoint", str(tmp_path / "ckpt"), "--json", str(out)]) == 0
    assert any("KV-shared" in n for n in json.loads(out.read_text())["notes"])
    assert main(["parity", "--hf-checkpoint", str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0

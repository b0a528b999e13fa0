"""Preflight lists every missing piece and never lets a run start without them; prepare and tiny helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.gsm8k.command import Options, build_plan
from harness.gsm8k.preflight import check_checkpoint, check_dataset, check_gpus, preflight
from harness.gsm8k.variants import tiny_e2e_config

H100 = ("NVIDIA H100 80GB HBM3", 79.6)


def _checkpoint(tmp_path: Path, config: dict, tokenizer: bool = True, weights: bool = True) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if weights:
        (d / "model.safetensors").write_bytes(b"\x00")
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


def _dataset(tmp_path: Path, row: dict | None = None) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps(row or {"messages": [{"role": "user", "content": "1+1?"}], "label": "2"}) + "\n"
    )
    return path


def test_nothing_present_lists_every_piece(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.gsm8k.command.default_slime_dir", lambda: None)
    plan = build_plan(Options("31b", workdir=tmp_path / "w"))
    problems = [
        str(p) for p in preflight(plan, inventory=(None, "nvidia-smi not found"), check_packages=False)
    ]
    text = "\n".join(problems)
    for piece in ("GPUs: need 8", "slime: train.py not found", "checkpoint: not given", "dataset: not given"):
        assert piece in text, text


def test_package_probe_runs_in_the_runs_environment(tmp_path):
    """Each of slime, sglang, ray and Megatron-LM that is not importable here is named (sglang may be installed
    without its GPU dependencies for the consumer contract tests), and our package is found."""
    import importlib.util

    plan = build_plan(Options("tiny", workdir=tmp_path / "w", slime_dir=tmp_path))
    problems = [str(p) for p in preflight(plan, inventory=([H100], ""))]
    missing = [p for p in problems if p.startswith("package")]
    absent = [
        name
        for name, module in (
            ("slime", "slime"),
            ("sglang", "sglang"),
            ("ray", "ray"),
            ("Megatron-LM", "megatron"),
        )
        if importlib.util.find_spec(module) is None
        or (module == "megatron" and importlib.util.find_spec("megatron.training") is None)
    ]
    assert absent, "this test needs at least one of the e2e packages to be absent"
    for name in absent:
        assert any(name in p for p in missing), missing
    assert not any("this project" in p for p in missing)


def test_everything_present_but_packages_is_clean(tmp_path):
    (tmp_path / "train.py").write_text("")
    opts = Options(
        "tiny",
        checkpoint=_checkpoint(tmp_path, tiny_e2e_config() | {"model_type": "gemma4_text"}),
        dataset=_dataset(tmp_path),
        slime_dir=tmp_path,
        workdir=tmp_path / "w",
    )
    assert preflight(build_plan(opts), inventory=([H100], ""), check_packages=False) == []


def test_gpu_count_and_memory():
    assert check_gpus(1, 10.0, ([H100], "")) == []
    assert "need 8, 1 visible" in str(check_gpus(8, 75.0, ([H100], ""))[0])
    assert "too small: NVIDIA A10 (22 GiB)" in str(check_gpus(1, 75.0, ([("NVIDIA A10", 22.0)], ""))[0])


def test_checkpoint_must_be_the_variants_model(tmp_path):
    ckpt = _checkpoint(tmp_path, tiny_e2e_config() | {"model_type": "gemma4_text"}, tokenizer=False)
    problems = [str(p) for p in check_checkpoint(ckpt, "31b")]
    assert any("num_hidden_layers = 8, but the 31b model flags say --num-layers 60" in p for p in problems)
    assert any("no tokenizer" in p for p in problems)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert any("is not Gemma 4" in str(p) for p in check_checkpoint(ckpt, "tiny"))


def test_dataset_formats(tmp_path):
    assert check_dataset(_dataset(tmp_path), "dataset", "messages", "label") == []
    bad = _dataset(tmp_path, {"prompt": "1+1?", "answer": "2"})
    assert "lacks ['messages', 'label']" in str(check_dataset(bad, "dataset", "messages", "label")[0])
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1" + b"\x00" * 8 + b"PAR1")
    assert check_dataset(parquet, "dataset", "messages", "label") == []
    parquet.write_bytes(b"nope")
    assert "not a Parquet file" in str(check_dataset(parquet, "dataset", "m", "l")[0])
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    assert "unsupported format" in str(check_dataset(csv, "dataset", "m", "l")[0])
    assert "not found or empty" in str(check_dataset(tmp_path / "none.jsonl", "dataset", "m", "l")[0])


def test_failed_preflight_exits_1_and_starts_nothing(tmp_path, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("a step was started after a failed preflight")

    monkeypatch.setattr("harness.gsm8k.launcher.run_step", refuse)
    monkeypatch.setattr("harness.gsm8k.preflight.gpu_inventory", lambda: (None, "nvidia-smi not found"))
    assert cli_main(["e2e-gsm8k", "--variant", "tiny", "--workdir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert (
        "preflight FAILED, nothing was started" in err and "GPUs:" in err and "checkpoint: not given" in err
    )


def test_tiny_checkpoint_is_described_by_the_tiny_script(tmp_path):
    from gemma4.config import text_spec_from_any
    from gemma4.slime.args import check_args
    from harness.gsm8k.model_args import read_model_args, script_path
    from harness.gsm8k.tiny import write_tiny_checkpoint
    from harness.testing.chat import build_test_tokenizer
    from harness.testing.slime import parse_megatron_flags

    tok = build_test_tokenizer(tmp_path / "tok")
    out = tmp_path / "tiny"
    files = write_tiny_checkpoint(out, tok)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    args = parse_megatron_flags(read_model_args(script_path("tiny")))
    assert check_args(args, text_spec_from_any(out)) == []
    assert check_checkpoint(out, "tiny") == []


@pytest.mark.skipif(sys.platform != "linux", reason="torch_dist save uses Linux multiprocessing")
def test_prepare_writes_a_megatron_load_dir_last_and_reuses_it(tmp_path):
    from harness.gsm8k.prepare import RELEASE, TRACKER, prepare
    from harness.presets import preset_config_dict
    from harness.testing.conversion import save_hf_checkpoint

    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    ref = tmp_path / "ref"
    assert prepare(hf, ref).startswith("converted")
    assert (ref / TRACKER).read_text() == RELEASE and (ref / RELEASE / ".metadata").is_file()
    assert prepare(hf, ref).startswith("reusing")

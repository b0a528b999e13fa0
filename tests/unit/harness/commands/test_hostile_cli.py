"""Hostile input against every command (issue 13): each defect the probe found, and the classes it found
handled well, kept as regression tests.

Conversion-specific defects (torch_dist ``relative_path`` traversal, FIFOs, ``--hf-config`` on per-rank
checkpoints) are in ``tests/unit/gemma4/conversion/test_conversion_hostile.py``; rank failures and the deadline at
the runner level in ``tests/unit/gemma4/model/parallel/test_runner.py``. Every refusal here must be exit 2 (or the code
the one table gives it), one line on stderr naming the flag, file, field or tensor, no traceback, and
nothing written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.cli import main
from harness.exit_codes import (
    EXIT_FAILED,
    EXIT_GOLDEN_BROKEN,
    EXIT_INVALID_INPUT,
    EXIT_RANK_FAILED,
    EXIT_TERMINATED,
)
from harness.presets import PRESETS, preset_config_dict
from harness.testing.conversion import save_hf_checkpoint

REPO = Path(__file__).resolve().parents[4]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *needles: str) -> None:
    """A refusal is one line (no traceback) containing every needle."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def config_file(tmp_path: Path, **changes) -> Path:
    cfg = preset_config_dict("tiny-31b") | changes
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory) -> Path:
    return save_hf_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", preset_config_dict("tiny-31b"))


# ---- defect 2: sizes are bounded before anything is allocated ---------------------------------------------


@pytest.mark.parametrize(
    "changes,flags",
    [
        ({"vocab_size": 10**12}, []),
        ({"hidden_size": 10**9}, []),
        ({}, ["--seq-len", str(10**9)]),
        ({}, ["--batch", str(10**8)]),
    ],
    ids=["vocab-1e12", "hidden-1e9", "seq-len-1e9", "batch-1e8"],
)
def test_huge_runs_are_refused_with_the_estimate(tmp_path, capsys, changes, flags):
    cfg = config_file(tmp_path, **changes)
    t0 = time.perf_counter()
    rc, _, err = run(["parity", "--hf-config", str(cfg), *flags], capsys)
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, "needs an estimated", "available", "--force")
    assert time.perf_counter() - t0 < 30


def test_100k_layers_are_refused_at_once(tmp_path, capsys):
    cfg = preset_config_dict("tiny-31b")
    cfg |= {"num_hidden_layers": 100_000, "layer_types": cfg["layer_types"] * 12_500}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    rc, _, err = run(["parity", "--hf-config", str(path)], capsys)
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, "num_hidden_layers", "100000")
    assert time.perf_counter() - t0 < 10


def test_estimate_scales_with_every_size():
    """The estimate grows with each knob the probe turned (a constant estimate would pass every test)."""
    from gemma4.config import text_spec_from_any
    from harness.budget import estimate_run

    base = preset_config_dict("tiny-31b")
    spec = text_spec_from_any(base)

    def parts(spec=spec, batch=2, seq=24, grads=False):
        return estimate_run(spec, torch.float64, batch, seq, grads=grads).parts

    ref = parts()
    assert parts(batch=20)["activations"] == 10 * ref["activations"]
    assert parts(batch=20)["logits"] == 10 * ref["logits"]
    assert parts(seq=240)["attention scores"] == 100 * ref["attention scores"]
    assert parts(grads=True)["weights"] == 2 * ref["weights"]
    wide = parts(text_spec_from_any(base | {"vocab_size": 25600}))
    assert wide["logits"] == 100 * ref["logits"] and wide["weights"] > 5 * ref["weights"]
    deep = parts(
        text_spec_from_any(base | {"num_hidden_layers": 80, "layer_types": base["layer_types"] * 10})
    )
    assert deep["module overhead"] == 10 * ref["module overhead"]


def test_force_overrides_the_estimate(monkeypatch, tmp_path, capsys):
    """--force runs anyway (here: pretend only 1 MB is available; the tiny preset needs ~26 MB)."""
    monkeypatch.setattr("harness.budget.available_bytes", lambda: 10**6)
    rc, _, err = run(["parity", "--preset", "tiny-31b", "--seq-len", "8"], capsys)
    assert rc == EXIT_INVALID_INPUT and "needs an estimated" in err
    rc, out, _ = run(["parity", "--preset", "tiny-31b", "--seq-len", "8", "--force"], capsys)
    assert rc == 0 and "forced past the memory estimate" in out


# ---- defects 3 and 4: every output path is checked before the work ----------------------------------------


def test_unwritable_outputs_are_refused_before_the_work(tmp_path, capsys, hf_ckpt):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    below = blocker / "sub" / "out.json"  # cannot exist: its parent is a regular file
    cases = [
        (["parity", "--preset", "tiny-31b", "--json", str(below)], "--json"),
        (["parity", "--preset", "tiny-31b", "--dump", str(blocker / "d")], "--dump"),
        (
            ["convert", "roundtrip", "--hf-checkpoint", str(hf_ckpt), "--workdir", str(blocker / "w")],
            "--workdir",
        ),
        (["goldens", "record", "--goldens-dir", str(blocker / "g")], "--goldens-dir"),
        (
            [
                "convert",
                "hf-to-mcore",
                "--hf-checkpoint",
                str(hf_ckpt),
                "--out",
                str(tmp_path / "m"),
                "--json",
                str(below),
            ],
            "--json",
        ),
    ]
    for argv, flag in cases:
        t0 = time.perf_counter()
        rc, _, err = run(argv, capsys)
        assert rc == EXIT_INVALID_INPUT, (argv, err)
        one_line_error(err, flag, "not a directory")
        assert time.perf_counter() - t0 < 5, argv  # refused before any model was built
    assert not (tmp_path / "m").exists()  # convert left no checkpoint behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_json_may_not_overwrite_an_input(tmp_path, capsys, hf_ckpt):
    cfg = config_file(tmp_path)
    messages = tmp_path / "conv.json"
    messages.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    before = {p: p.read_bytes() for p in (cfg, messages, hf_ckpt / "config.json")}
    cases = [
        (["parity", "--hf-config", str(cfg), "--json", str(cfg)], "is the command's input --hf-config"),
        (
            [
                "convert",
                "hf-to-mcore",
                "--hf-checkpoint",
                str(hf_ckpt),
                "--out",
                str(tmp_path / "m"),
                "--json",
                str(hf_ckpt / "config.json"),
            ],
            "inside the input directory --hf-checkpoint",
        ),
        (
            [
                "mask",
                "--tokenizer",
                str(tmp_path / "tok"),
                "--messages",
                str(messages),
                "--json",
                str(messages),
            ],
            "is the command's input --messages",
        ),
        (
            [
                "convert",
                "mcore-to-hf",
                "--mcore",
                str(tmp_path / "mc"),
                "--out",
                str(tmp_path / "h"),
                "--hf-config",
                str(cfg),
                "--json",
                str(cfg),
            ],
            "is the command's input --hf-config",
        ),
        (
            ["parity", "--hf-checkpoint", str(hf_ckpt), "--dump", str(hf_ckpt / "dump")],
            "inside the input directory",
        ),
    ]
    for argv, needle in cases:
        rc, _, err = run(argv, capsys)
        assert rc == EXIT_INVALID_INPUT, (argv, err)
        one_line_error(err, needle)
    assert {p: p.read_bytes() for p in before} == before


def test_symlink_to_an_input_is_the_input(tmp_path, capsys):
    cfg = config_file(tmp_path)
    link = tmp_path / "link.json"
    link.symlink_to(cfg)
    rc, _, err = run(["parity", "--hf-config", str(cfg), "--json", str(link)], capsys)
    assert rc == EXIT_INVALID_INPUT and "is the command's input" in err


def test_two_outputs_on_one_path(tmp_path, capsys):
    rc, _, err = run(
        ["report", "--out", str(tmp_path / "r"), "--junit", str(tmp_path / "r"), "--no-goldens"], capsys
    )
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, "--junit")


# ---- defect 5: SIGTERM removes temp files like SIGINT does ------------------------------------------------


def test_sigterm_removes_the_temp_output_directory(tmp_path):
    # A checkpoint large enough (~40 MB) that the conversion is still writing when the signal arrives.
    cfg = preset_config_dict("tiny-31b") | {
        "vocab_size": 40_000,
        "hidden_size": 256,
        "intermediate_size": 512,
    }
    src = save_hf_checkpoint(tmp_path / "hf", cfg)
    out = tmp_path / "out" / "mcore"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness",
            "convert",
            "hf-to-mcore",
            "--hf-checkpoint",
            str(src),
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(out.parent.glob(".mcore.tmp-*")):  # the temp directory beside --out exists
            assert proc.poll() is None, f"finished before the signal could be sent: {proc.communicate()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_TERMINATED, err
    assert "terminated" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []  # neither the temp directory nor a half checkpoint


# ---- defect 6: a failed or hung rank has its own exit code and one paragraph --------------------------------


def _boom(*args, **kwargs):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # rank 0 waits for the dead peer: it must not be blamed


def _hang(*args, **kwargs):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(600)
    dist.barrier()


@pytest.mark.xdist_group("multiprocess")
def test_failed_rank_exits_5_naming_the_rank(monkeypatch, capsys):
    monkeypatch.setattr("harness.parity.megatron_side.run_megatron_rank", _boom)
    rc, _, err = run(["parity", "--preset", "tiny-31b", "--tp", "2", "--seq-len", "8"], capsys)
    assert rc == EXIT_RANK_FAILED, err
    assert "rank 1" in err and "planted failure on rank 1" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 8


@pytest.mark.xdist_group("multiprocess")
def test_hung_rank_is_stopped_at_the_deadline_flag(monkeypatch, capsys):
    monkeypatch.setattr("harness.parity.megatron_side.run_megatron_rank", _hang)
    t0 = time.perf_counter()
    rc, _, err = run(
        ["parity", "--preset", "tiny-31b", "--tp", "2", "--seq-len", "8", "--deadline", "10"], capsys
    )
    assert rc == EXIT_RANK_FAILED, err
    assert time.perf_counter() - t0 < 60
    # rank 1 is named; under heavy load rank 0 may still be starting at the deadline and be named too
    assert "did not finish within the 10 s deadline" in err and "Traceback" not in err
    assert re.search(r"ranks? (\d+, )*1\b", err), err


# ---- defect 7: numbers that crashed --------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (
            lambda c: c["rope_parameters"]["full_attention"].update(partial_rotary_factor="a quarter"),
            "partial_rotary_factor",
        ),
        (lambda c: c.update(pad_token_id=c["vocab_size"]), "pad_token_id"),
        (lambda c: c.update(eos_token_id=[1, 10**6]), "eos_token_id[1]"),
        (lambda c: c["rope_parameters"]["sliding_attention"].update(rope_theta="1e4"), "rope_theta"),
        (lambda c: c.update(rms_norm_eps=True), "rms_norm_eps"),
    ],
    ids=["partial-rotary-string", "pad-id-out-of-vocab", "eos-id-out-of-vocab", "theta-string", "eps-bool"],
)
def test_bad_numbers_in_a_config_exit_2(tmp_path, capsys, mutate, needle):
    cfg = preset_config_dict("tiny-31b")
    mutate(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rc, _, err = run(["parity", "--hf-config", str(path)], capsys)
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, needle)


@pytest.mark.parametrize("seed", [str(2**63), "-1", "1e3"])
def test_bad_seed_exits_2(capsys, seed):
    rc, _, err = run(["parity", "--preset", "tiny-31b", "--seed", seed], capsys)
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, "--seed")


# ---- defect 8: non-finite input is named as such, never passed and never blamed on the port -------------------


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_weight_in_a_checkpoint_exits_2_naming_it(tmp_path, capsys, hf_ckpt, value):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((hf_ckpt / "config.json").read_bytes())
    tensors = load_file(hf_ckpt / "model.safetensors")
    name = "model.layers.3.self_attn.q_proj.weight"
    tensors[name][0, 0] = value
    save_file(tensors, ckpt / "model.safetensors")
    rc, out, err = run(["parity", "--hf-checkpoint", str(ckpt), "--dtype", "float32"], capsys)
    assert rc == EXIT_INVALID_INPUT, out + err
    one_line_error(err, "non-finite", "layers.3.self_attn.q_proj.weight")
    assert "PASS" not in out and "divergence" not in out + err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_in_config_json_exits_2(tmp_path, capsys, literal):
    path = config_file(tmp_path)
    path.write_text(path.read_text().replace('"rope_theta": 10000.0', f'"rope_theta": {literal}'))
    assert literal in path.read_text()
    rc, _, err = run(["parity", "--hf-config", str(path)], capsys)
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, literal)


def test_non_finite_config_value_from_python_is_a_config_error():
    from gemma4.config import text_spec_from_any
    from gemma4.errors import ConfigError

    cfg = preset_config_dict("tiny-31b")
    cfg["rope_parameters"]["full_attention"]["rope_theta"] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        text_spec_from_any(cfg)


def test_noise_floor_never_widens_to_infinity():
    from harness.tolerances import FP32_STOCK, NonFiniteNoiseError, reordered

    for bad in (float("inf"), float("nan")):
        with pytest.raises(NonFiniteNoiseError):
            reordered(FP32_STOCK, bad, 1e-6, 1e-9)
        with pytest.raises(NonFiniteNoiseError):
            reordered(FP32_STOCK, 1e-6, 1e-6, bad)
    assert reordered(FP32_STOCK, 1e-6, 1e-6, 1e-12).logits_max_abs == FP32_STOCK.logits_max_abs


def test_non_finite_output_of_ours_is_a_failure_never_a_pass(monkeypatch):
    """A NaN in our logits or activations fails parity (a comparison with NaN is False both ways)."""
    import harness.parity as parity

    real = parity.megatron_side._assemble

    def poisoned(results, layout, seq):
        logits, acts = real(results, layout, seq)
        logits = logits.clone()
        logits[0, 3, 5] = float("nan")
        acts["logits"] = logits
        acts["layer.2.mlp"] = acts["layer.2.mlp"].clone().fill_(float("nan"))
        return logits, acts

    monkeypatch.setattr(parity.megatron_side, "_assemble", poisoned)
    result = parity.run_parity(parity.resolve_source(preset="tiny-31b"), torch.float64, seq_len=8)
    assert result["pass"] is False
    assert result["first_divergence"] == "layer 2 (sliding_attention) mlp"


def test_non_finite_reference_is_input_not_the_port(monkeypatch):
    """If HF itself produces inf/NaN, the run is refused as input (exit 2), not reported as a port bug."""
    import harness.parity as parity
    from gemma4.errors import InvalidInputError

    real = parity.reference_side.run_reference

    def overflowing(hf, ids, cu, packed, grads):
        logits, acts = real(hf, ids, cu, packed, grads)
        acts["layer.1.attention"] = acts["layer.1.attention"] * float("inf")
        return logits, acts

    monkeypatch.setattr(parity.reference_side, "run_reference", overflowing)
    with pytest.raises(InvalidInputError, match=r"HF reference itself is non-finite at layer 1 .* attention"):
        parity.run_parity(parity.resolve_source(preset="tiny-31b"), torch.float64, seq_len=8)


# ---- defect 9: deep JSON is refused, never a RecursionError ------------------------------------------------


def test_deeply_nested_json_is_refused_in_every_reader(tmp_path, capsys, hf_ckpt):
    deep = "[" * 100_000 + "]" * 100_000
    cfg = tmp_path / "config.json"
    cfg.write_text(deep)
    rc, _, err = run(["parity", "--hf-config", str(cfg)], capsys)
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, "nested too deeply")

    messages = tmp_path / "messages.json"
    messages.write_text(deep)
    rc, _, err = run(
        [
            "mask",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--messages",
            str(messages),
            "--json",
            str(tmp_path / "o.json"),
        ],
        capsys,
    )
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, "nested too deeply")

    goldens = tmp_path / "goldens"
    goldens.mkdir()
    (goldens / "manifest.json").write_text(deep)
    rc, out, _ = run(
        ["goldens", "check", "--goldens-dir", str(goldens), "--only", "forward/tiny-31b/float64"], capsys
    )
    assert rc == EXIT_GOLDEN_BROKEN and "nested too deeply" in out


def test_tool_call_arguments_nested_500_deep_exit_2(tmp_path, capsys):
    from gemma4.chat.mask import build_chat_mask
    from gemma4.chat.tokenizer import load_tokenizer
    from gemma4.errors import InvalidInputError
    from harness.assets import load_gemma4_chat_template
    from harness.testing.chat import build_test_tokenizer

    args: object = "x"
    for _ in range(500):
        args = {"a": args}
    conv = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": args}}],
        },
    ]
    messages = tmp_path / "conv.json"
    messages.write_text(json.dumps(conv))  # 500 levels: beyond the readers' bound of 64
    tok = build_test_tokenizer(tmp_path / "tok", chat_template=load_gemma4_chat_template())
    rc, _, err = run(
        ["mask", "--tokenizer", str(tok), "--messages", str(messages), "--json", str(tmp_path / "o.json")],
        capsys,
    )
    assert rc == EXIT_INVALID_INPUT
    one_line_error(err, "nested too deeply")
    assert not (tmp_path / "o.json").exists()
    # The Python API (slime passes parsed messages) refuses them too, before Jinja recurses.
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        build_chat_mask(load_tokenizer(tok), conv, on_mismatch="ignore")


def test_strict_json_reader_refuses_nan_and_depth():
    from gemma4.errors import InvalidInputError
    from gemma4.safe_read import MAX_JSON_DEPTH, loads_json

    assert loads_json('{"a": [1, 2.5, null]}', "x") == {"a": [1, 2.5, None]}
    assert loads_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x")
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        loads_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "x")
    with pytest.raises(InvalidInputError, match="NaN"):
        loads_json('{"a": NaN}', "x")


# ---- defect 10: an invalid config in a goldens manifest is a broken golden (4), not a regression (1) ------------


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: c.update(num_attention_heads=3), "num_key_value_heads"),
        (lambda c: c.update(vocab_size=10**12), "needs an estimated"),
        (lambda c: c.update(layer_types=["sliding_attention"]), "layer_types"),
    ],
    ids=["heads-do-not-divide", "vocab-1e12", "layer-types-short"],
)
def test_invalid_config_in_goldens_manifest_is_a_broken_golden(tmp_path, capsys, mutate, needle):
    import shutil

    goldens = tmp_path / "goldens"
    shutil.copytree(REPO / "goldens", goldens)
    manifest = json.loads((goldens / "manifest.json").read_text())
    mutate(manifest["cases"]["forward/tiny-31b/float64"]["config"])
    (goldens / "manifest.json").write_text(json.dumps(manifest))
    rc, out, _ = run(
        ["goldens", "check", "--goldens-dir", str(goldens), "--only", "forward/tiny-31b/float64"], capsys
    )
    assert rc == EXIT_GOLDEN_BROKEN, out
    assert "forward/tiny-31b/float64" in out and needle in out


# ---- one flag name per concept, help from the tables ---------------------------------------------------------


def test_help_lists_every_preset_and_layout(capsys):
    from harness.report.layouts import LAYOUTS

    for argv in (["parity", "--help"], ["e2e-mini", "--help"], ["report", "--help"]):
        rc, out, _ = run(argv, capsys)
        assert rc == 0
        flat = " ".join(out.split())
        for name in PRESETS:
            assert name in flat, (argv, name)
    rc, out, _ = run(["report", "--help"], capsys)
    assert all(layout["name"] in " ".join(out.split()) for layout in LAYOUTS)
    rc, out, _ = run(["--help"], capsys)
    assert "exit codes" in out and " 5 " in out


def test_hf_checkpoint_is_one_flag_old_spellings_stay_hidden_aliases(tmp_path, capsys, hf_ckpt):
    for argv in (
        ["convert", "roundtrip", "--help"],
        ["convert", "hf-to-mcore", "--help"],
        ["e2e-gsm8k", "--help"],
    ):
        rc, out, _ = run(argv, capsys)
        assert rc == 0 and "--hf-checkpoint" in out
        assert "--hf " not in out and "--checkpoint " not in out and "--timeout" not in out
    rc, out, _ = run(["convert", "roundtrip", "--hf", str(hf_ckpt)], capsys)  # the old spelling still works
    assert rc == 0 and "bit-exact" in out
    import argparse

    from harness.commands.e2e_gsm8k import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--checkpoint", "/x"]).checkpoint == Path("/x")
    assert p.parse_args(["--hf-checkpoint", "/y"]).checkpoint == Path("/y")
    assert p.parse_args(["--timeout", "7"]).timeout == 7 == p.parse_args(["--deadline", "7"]).timeout


def test_exit_codes_are_one_table():
    """No two meanings share a code, and the CLI's constants are the table's."""
    import harness.cli as cli
    from harness.exit_codes import EXIT_CODES
    from harness.goldens import outcome

    assert len(set(EXIT_CODES)) == len(EXIT_CODES)
    assert cli.EXIT_FAILED == EXIT_FAILED and cli.EXIT_INVALID_INPUT == EXIT_INVALID_INPUT
    assert outcome.EXIT_GOLDEN_BROKEN == EXIT_GOLDEN_BROKEN and outcome.EXIT_HF_DRIFT in EXIT_CODES


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_temp_creation_cannot_leak_it(tmp_path, monkeypatch, sig):
    """The race the SIGTERM test can only hit by chance, made deterministic: the signal lands right after
    ``mkdtemp``/``mkstemp`` created the entry, before any cleanup ``try`` could be entered."""
    import tempfile

    from gemma4 import atomic_io
    from harness.cli import Terminated, _on_sigterm

    expected = KeyboardInterrupt if sig == signal.SIGINT else Terminated
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for name in ("mkdtemp", "mkstemp"):
            real = getattr(tempfile, name)

            def interrupted(*args, _real=real, **kwargs):
                created = _real(*args, **kwargs)
                os.kill(os.getpid(), sig)  # delivered at the next bytecode boundary
                time.sleep(0.01)
                return created

            monkeypatch.setattr(tempfile, name, interrupted)
            with pytest.raises(expected):
                if name == "mkdtemp":
                    with atomic_io.atomic_output_dir(tmp_path / "out"):
                        raise AssertionError("the body must not run")
                else:
                    atomic_io.atomic_write_bytes(tmp_path / "f.json", b"{}")
            monkeypatch.setattr(tempfile, name, real)
            signal.signal(signal.SIGTERM, _on_sigterm)  # the CLI handler ignores a second SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []

"""Goldens as evidence: round trip, damage of every kind is detected and named, records are refused or atomic.

Each test damages a private copy of goldens recorded once per session (see conftest) and runs the real
``gemma4-harness goldens`` command in-process. Exit codes: 0 ok, 1 regression, 2 invalid input, 3 HF drift,
4 missing/corrupt/unreadable golden.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

import harness.goldens.record as record_module
import harness.goldens.registry as registry
import harness.goldens.store as store
from harness.cli import main

SMALL = ["forward/tiny-12b/float64", "rope/tiny-12b/float32", "weights/tiny-12b/float32"]
FWD = "forward/tiny-12b/float64"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def case_path(goldens: Path, case: str) -> Path:
    entry = json.loads((goldens / "manifest.json").read_text())["cases"][case]
    return goldens / next(iter(entry["files"]))


def rewrite_safetensors(goldens: Path, case: str, mutate, fix_sha: bool = False) -> Path:
    """Change a tensor of a case in place; with ``fix_sha`` the manifest is updated to match (a wrong golden
    that passes the integrity check)."""
    path = case_path(goldens, case)
    tensors = load(path.read_bytes())
    mutate(tensors)
    data = save(tensors)
    path.write_bytes(data)
    if fix_sha:
        manifest_path = goldens / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        rel = path.relative_to(goldens).as_posix()
        manifest["cases"][case]["files"][rel] = store.sha256_bytes(data)
        manifest_path.write_text(json.dumps(manifest))
    return path


def check(goldens: Path, capsys, *only: str) -> tuple[int, str]:
    args = ["goldens", "check", "--goldens-dir", str(goldens)]
    for token in only or SMALL:
        args += ["--only", token]
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_round_trip_record_then_check(goldens, capsys):
    rc, out = check(goldens, capsys)
    assert rc == 0, out
    assert out.count("  ok ") == 3 and "OK (3 ok; exit 0)" in out
    manifest = json.loads((goldens / "manifest.json").read_text())
    assert manifest["schema_version"] == store.SCHEMA_VERSION
    for name, entry in manifest["cases"].items():
        assert {
            "family",
            "preset",
            "config",
            "seed",
            "inputs",
            "dtype",
            "tolerance",
            "files",
            "command",
        } <= set(entry)
        assert {"python", "torch", "transformers", "megatron-core", "platform"} <= set(entry["producer"])
        for rel, sha in entry["files"].items():
            assert store.sha256_bytes((goldens / rel).read_bytes()) == sha, name
    assert not [p for p in goldens.rglob("*") if p.name.endswith(".tmp")]
    report_json = goldens.parent / "check.json"
    only = [arg for case in SMALL for arg in ("--only", case)]
    assert main(["goldens", "check", *only, "--goldens-dir", str(goldens), "--json", str(report_json)]) == 0
    result = json.loads(report_json.read_text())
    assert result["exit_code"] == 0 and [o["status"] for o in result["outcomes"]] == ["pass"] * 3


def test_tampered_value_is_detected_and_names_the_file(goldens, capsys):
    def bump(t):
        t["logits"][0, 5, 7] += 1e-3

    path = rewrite_safetensors(goldens, "forward/tiny-12b/float64", bump)
    rc, out = check(goldens, capsys)
    assert rc == 4, out
    assert f"{path}: corrupt golden file of case 'forward/tiny-12b/float64'" in out
    assert "BROKEN GOLDEN" in out and "rope/tiny-12b/float32" in out  # the others are still checked


def test_wrong_but_consistent_golden_is_caught_by_recomputation(goldens, capsys):
    """sha256 matches the manifest, but the stored HF logits are wrong: ours and HF both disagree with it."""

    def bump(t):
        t["logits"][1, 20, 3] += 1e-6  # 1000x the fp64 bound

    path = rewrite_safetensors(goldens, "forward/tiny-12b/float64", bump, fix_sha=True)
    rc, out = check(goldens, capsys, FWD)
    assert rc == 3, out
    rel = path.relative_to(goldens).as_posix()
    assert f"HF and our model both moved away from golden {rel} (first at logits (max|d|" in out


def test_deleted_file_is_detected(goldens, capsys):
    path = case_path(goldens, "rope/tiny-12b/float32")
    path.unlink()
    rc, out = check(goldens, capsys)
    assert rc == 4, out
    assert f"{path}: missing golden file of case 'rope/tiny-12b/float32'" in out


def test_deleted_manifest_fails_every_case(goldens, capsys):
    (goldens / "manifest.json").unlink()
    rc, out = check(goldens, capsys)
    assert rc == 4 and out.count("manifest.json: missing") == 3, out


def test_case_missing_from_the_manifest(goldens, capsys):
    rc, out = check(goldens, capsys, "forward/tiny-31b/float32")
    assert rc == 4
    assert "no golden recorded for case 'forward/tiny-31b/float32'" in out


def test_unreadable_safetensors_is_named(goldens, capsys):
    path = case_path(goldens, "rope/tiny-12b/float32")
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    manifest = json.loads((goldens / "manifest.json").read_text())
    manifest["cases"]["rope/tiny-12b/float32"]["files"][path.relative_to(goldens).as_posix()] = (
        store.sha256_bytes(path.read_bytes())
    )
    (goldens / "manifest.json").write_text(json.dumps(manifest))
    rc, out = check(goldens, capsys, "rope/tiny-12b/float32")
    assert rc == 4 and f"{path}: unreadable safetensors" in out, out


def test_manifest_path_outside_the_goldens_is_refused(goldens, capsys):
    manifest = json.loads((goldens / "manifest.json").read_text())
    manifest["cases"]["rope/tiny-12b/float32"]["files"] = {"../escape.safetensors": "0" * 64}
    (goldens / "manifest.json").write_text(json.dumps(manifest))
    rc, out = check(goldens, capsys, "rope/tiny-12b/float32")
    assert rc == 4 and "leaves the goldens directory" in out


def test_unknown_schema_version_is_a_clear_error_and_record_refuses(goldens, capsys):
    manifest = json.loads((goldens / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (goldens / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(goldens)
    rc, out = check(goldens, capsys)
    assert rc == 4
    assert "manifest.json: unknown schema_version 99; this harness reads schema_version 1" in out
    rc = main(["goldens", "record", "--update", "--only", "rope", "--goldens-dir", str(goldens)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown schema_version 99" in err and "refusing to record over it" in err
    assert snapshot(goldens) == before


def test_record_without_update_is_refused_and_changes_nothing(goldens, capsys):
    before = snapshot(goldens)
    rc = main(["goldens", "record", "--only", "rope/tiny-12b/float32", "--goldens-dir", str(goldens)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "golden 'rope/tiny-12b/float32' already exists" in err and "--update" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(goldens) == before


def test_update_prints_what_changed_and_by_how_much(goldens, capsys):
    def bump(t):
        t["layer.2.mlp"][0, 3, 1] += 0.25

    old = rewrite_safetensors(goldens, "forward/tiny-12b/float64", bump, fix_sha=True)
    rc = main(["goldens", "record", "--update", "--only", FWD, "--goldens-dir", str(goldens)])
    out = capsys.readouterr().out
    assert rc == 0
    assert (
        "updated forward/tiny-12b/float64: 1 of 25 tensors changed; logits max|d| 0.00e+00; largest change 2.50e-01 at layer.2.mlp"
        in out
    )
    assert not old.exists()  # the superseded file is removed, the new one is referenced
    rc, out = check(goldens, capsys)
    assert rc == 0 and "stray file" not in out
    before = snapshot(goldens)
    only = [arg for case in SMALL for arg in ("--only", case)]
    rc = main(["goldens", "record", "--update", *only, "--goldens-dir", str(goldens)])
    out = capsys.readouterr().out
    assert rc == 0 and all(f"unchanged {case}" in out for case in SMALL), out
    assert snapshot(goldens) == before  # recording is reproducible byte for byte: no churn, provenance kept


def test_interrupted_record_leaves_the_old_golden_intact(goldens, capsys, monkeypatch):
    def bump(t):
        t["logits"][0, 0, 0] += 1.0

    rewrite_safetensors(goldens, "forward/tiny-12b/float64", bump, fix_sha=True)  # so a record has to write
    before = snapshot(goldens)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the new files, before the manifest (the commit point)

    monkeypatch.setattr(record_module, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        record_module.record_goldens(goldens, [FWD], update=True)
    after = snapshot(goldens)
    assert {k: v for k, v in after.items() if k in before} == before  # every old file, manifest included
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and new[0].startswith("forward/tiny-12b/float64.")  # content-addressed, not in use
    rc, out = check(goldens, capsys, FWD)
    assert rc == 3 and "stray file" in out  # the old (tampered) golden is what is checked
    monkeypatch.undo()
    record_module.record_goldens(goldens, [FWD], update=True)
    rc, out = check(goldens, capsys, FWD)
    assert rc == 0 and "stray file" not in out


def test_crash_while_writing_a_file_leaves_no_partial_file(goldens, monkeypatch):
    def bump(t):
        t["logits"][0, 0, 0] += 1.0

    rewrite_safetensors(goldens, "forward/tiny-12b/float64", bump, fix_sha=True)
    before = snapshot(goldens)

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    import gemma4.atomic_io

    monkeypatch.setattr(gemma4.atomic_io.os, "replace", crash)
    with pytest.raises(OSError):
        record_module.record_goldens(goldens, [FWD], update=True)
    assert snapshot(goldens) == before  # temp file removed, nothing renamed


def test_unknown_only_is_invalid_input(goldens, capsys, monkeypatch):
    rc = main(["goldens", "check", "--only", "forwrd", "--goldens-dir", str(goldens)])
    err = capsys.readouterr().err
    assert rc == 2 and "--only 'forwrd' matches no golden case" in err
    monkeypatch.setitem(registry.PENDING, "widgets", "widget goldens: pending (no widget model yet)")
    rc = main(["goldens", "check", "--only", "widgets", "--goldens-dir", str(goldens)])
    assert rc == 2 and "--only 'widgets': widget goldens: pending" in capsys.readouterr().err


def test_version_differences_are_reported(goldens, capsys):
    manifest = json.loads((goldens / "manifest.json").read_text())
    manifest["cases"]["rope/tiny-12b/float32"]["producer"]["transformers"] = "4.0.0"
    (goldens / "manifest.json").write_text(json.dumps(manifest))
    rc, out = check(goldens, capsys, "rope/tiny-12b/float32")
    assert rc == 0
    assert "version difference: transformers recorded 4.0.0, now" in out and "rope/tiny-12b/float32" in out


def test_size_budget_is_enforced_by_record(goldens, monkeypatch):
    from gemma4.errors import InvalidInputError

    monkeypatch.setattr(record_module, "SIZE_BUDGET_BYTES", 1000)
    before = snapshot(goldens)
    with pytest.raises(InvalidInputError, match="over the .* budget"):
        record_module.record_goldens(goldens, [FWD], update=True)
    assert snapshot(goldens) == before


def test_tensor_checksum_covers_dtype_shape_and_bytes():
    t = torch.arange(6, dtype=torch.float32)
    base = store.tensor_sha256(t)
    assert store.tensor_sha256(t.clone()) == base
    assert store.tensor_sha256(t.reshape(2, 3)) != base
    assert store.tensor_sha256(t.to(torch.int32)) != store.tensor_sha256(
        t.to(torch.int32).view(torch.float32)
    )
    t2 = t.clone()
    t2[3] = torch.nextafter(t2[3], torch.tensor(10.0))
    assert store.tensor_sha256(t2) != base


def test_update_replaces_a_broken_golden_and_says_so(goldens, capsys):
    path = case_path(goldens, "rope/tiny-12b/float32")
    path.write_bytes(b"garbage")
    rc = main(
        ["goldens", "record", "--update", "--only", "rope/tiny-12b/float32", "--goldens-dir", str(goldens)]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert f"replaced rope/tiny-12b/float32: the old golden was broken ({path}: corrupt golden file" in out
    assert check(goldens, capsys)[0] == 0

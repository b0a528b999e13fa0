"""Hostile checkpoints (issue 13): nothing read from a checkpoint escapes it, blocks, or crashes the reader.

* every path named inside a checkpoint (a safetensors index's ``weight_map``, a ``torch_dist``
  ``relative_path``) stays lexically inside it and names a regular file (symlinks are followed: HF caches
  link snapshots to blobs);
* every file read (config.json, index, shards, manifest, rank files, ``.metadata``, ``.distcp``) is a
  regular file: a FIFO named ``model.safetensors`` is refused, not waited on;
* JSON is strict: ``NaN``/``Infinity`` and very deep nesting are refused with exit 2, never a traceback;
* ``mcore-to-hf --hf-config`` is never silently ignored: it must agree with the manifest's config.

Each refusal is exit 2 with one line naming the file (and tensor or field), and leaves no output behind.
Malformed safetensors headers, headers longer than the file and crafted pickles in ``.metadata`` are
covered by ``test_conversion_safetensors.py``, ``test_conversion_cli.py`` and
``test_conversion_torch_dist.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch

from gemma4.conversion.mcore_io import MANIFEST
from gemma4.errors import InvalidInputError
from harness.cli import main
from harness.presets import preset_config_dict
from harness.testing.conversion import save_hf_checkpoint, state_dict_failures, stored_tensors

#: The CLI's one-line refusal: ``gemma4-harness convert[ <direction>]: error: ...``.
ONE_LINE_ERROR = re.compile(r"gemma4-harness convert( [a-z-]+)?: error: ")
PRESET = "tiny-12b"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc: int, err: str, needles: list[str], out: Path) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and ONE_LINE_ERROR.match(err), err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists() or not any(out.iterdir()), "partial output left behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")], "temp dir left"


# ---- shared checkpoints (built once, copied before being broken) ----------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hostile")
    hf = save_hf_checkpoint(base / "hf", preset_config_dict(PRESET), seed=5)
    sharded = save_hf_checkpoint(base / "hf-sharded", preset_config_dict(PRESET), seed=5, shards=2)
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(base / "mc")]) == 0
    argv = ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(base / "td"), "--format", "torch_dist"]
    assert main(argv) == 0
    return {"hf": hf, "sharded": sharded, "mc": base / "mc", "td": base / "td"}


@pytest.fixture
def ckpt(built, tmp_path):
    """A fresh copy of one of the built checkpoints: ``ckpt("hf")``."""

    def copy(kind: str) -> Path:
        dst = tmp_path / kind
        shutil.copytree(built[kind], dst, symlinks=True)
        return dst

    return copy


def mcore_to_hf(mc: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return run(["convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(out), *extra], capsys)


# ---- defect 1: torch_dist relative_path outside the checkpoint --------------------------------------


def _rewrite_metadata(td: Path, edit) -> None:
    """Rewrite ``td/.metadata`` (our own trusted pickle) through ``edit(metadata)``."""
    path = td / ".metadata"
    with open(path, "rb") as f:
        meta = pickle.load(f)  # noqa: S301 - the test's own checkpoint
    edit(meta)
    path.write_bytes(pickle.dumps(meta))


def _redirect(td: Path, key_part: str, target: str) -> str:
    """Point the storage of the first tensor whose key contains ``key_part`` at ``target``."""
    hit: list[str] = []

    def edit(meta):
        for index, info in list(meta.storage_data.items()):
            if key_part in index.fqn:
                meta.storage_data[index] = dataclasses.replace(info, relative_path=target)
                hit.append(index.fqn)
                return

    _rewrite_metadata(td, edit)
    assert hit
    return hit[0]


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_torch_dist_relative_path_outside_the_checkpoint_is_refused(ckpt, tmp_path, capsys, how):
    """Before: exit 0, the export held a tensor read from a .distcp outside the checkpoint."""
    td = ckpt("td")
    distcp = sorted(td.glob("*.distcp"))[0]
    outside = tmp_path / "outside.distcp"
    shutil.copy(distcp, outside)  # same bytes: only the location is wrong
    target = "../outside.distcp" if how == "dotdot" else str(outside)
    key = _redirect(td, "embedding.word_embeddings.weight", target)
    out = tmp_path / "o"
    rc, _, err = mcore_to_hf(td, out, capsys)
    assert_refused(rc, err, [str(td / ".metadata"), repr(target), "leaves the checkpoint", repr(key)], out)


def test_torch_dist_storage_must_be_a_regular_file(ckpt, tmp_path, capsys):
    td = ckpt("td")
    (td / "sub.distcp").mkdir()
    key = _redirect(td, "decoder.final_layernorm.weight", "sub.distcp")
    out = tmp_path / "o"
    rc, _, err = mcore_to_hf(td, out, capsys)
    assert_refused(rc, err, [str(td / "sub.distcp"), "regular file", "a directory", repr(key)], out)


def test_torch_dist_byte_range_beyond_the_file_is_refused(ckpt, tmp_path, capsys):
    td = ckpt("td")
    hit: list[str] = []

    def edit(meta):
        for index, info in meta.storage_data.items():
            if "final_layernorm" in index.fqn:
                meta.storage_data[index] = dataclasses.replace(info, offset=info.offset + 10**9)
                hit.append(index.fqn)
                return

    _rewrite_metadata(td, edit)
    out = tmp_path / "o"
    rc, _, err = mcore_to_hf(td, out, capsys)
    assert_refused(rc, err, [str(td / ".metadata"), repr(hit[0]), "beyond the end"], out)


def test_megatron_load_checks_the_metadata_before_dcp_reads_it(ckpt, tmp_path):
    """``load_torch_dist_into_model`` hands the directory to DCP, whose reader unpickles ``.metadata``
    freely and follows any ``relative_path``: our checks run first."""
    from gemma4.config import text_spec_from_any
    from gemma4.conversion.torch_dist import load_torch_dist_into_model
    from gemma4.model.build import build_gemma4_model

    td = ckpt("td")
    outside = tmp_path / "outside.distcp"
    shutil.copy(sorted(td.glob("*.distcp"))[0], outside)
    _redirect(td, "embedding.word_embeddings.weight", str(outside))
    spec = text_spec_from_any(preset_config_dict(PRESET))
    model = build_gemma4_model(spec, torch.float32, hetereogenous_dist_checkpoint=True)
    with pytest.raises(InvalidInputError, match="leaves the checkpoint"):
        load_torch_dist_into_model(model, td)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM",))


def test_megatron_load_never_unpickles_a_crafted_metadata(ckpt, tmp_path, monkeypatch):
    """Before: DCP's reader (``pickle.load``) ran the payload of a crafted ``.metadata`` when Megatron loaded
    the directory; the allow-list unpickler refuses it first."""
    from gemma4.config import text_spec_from_any
    from gemma4.conversion.torch_dist import load_torch_dist_into_model
    from gemma4.model.build import build_gemma4_model

    monkeypatch.chdir(tmp_path)
    td = ckpt("td")
    (td / ".metadata").write_bytes(pickle.dumps(_Boom()))
    spec = text_spec_from_any(preset_config_dict(PRESET))
    model = build_gemma4_model(spec, torch.float32, hetereogenous_dist_checkpoint=True)
    with pytest.raises(InvalidInputError, match="refusing to unpickle"):
        load_torch_dist_into_model(model, td)
    assert not (tmp_path / "BOOM").exists()


# ---- defect 11: FIFOs (and other non-regular files) are refused, never waited on ------------------------


def _with_deadline(fn, fifo: Path, seconds: float = float(os.environ.get("HOSTILE_FIFO_DEADLINE", "120"))):
    """Run ``fn`` in a thread; if it is still blocked after ``seconds`` (a reader opened the FIFO), unblock
    it by opening the FIFO's other end and fail."""
    box: dict[str, object] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
            try:
                os.close(os.open(fifo, flags))
            except OSError:
                pass
        t.join(30)
        pytest.fail(f"blocked on the FIFO {fifo} for {seconds:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]


def _fifo(path: Path) -> Path:
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


HF_FIFOS = {
    "model.safetensors": ("hf", "model.safetensors"),
    "config.json": ("hf", "config.json"),
    "index": ("sharded", "model.safetensors.index.json"),
    "shard": ("sharded", "model-00002-of-00002.safetensors"),
}


@pytest.mark.parametrize("which", sorted(HF_FIFOS))
def test_fifo_in_hf_checkpoint_is_refused(ckpt, tmp_path, capsys, which):
    """Before: ``convert hf-to-mcore`` with a FIFO named model.safetensors blocked forever in open()."""
    kind, name = HF_FIFOS[which]
    hf = ckpt(kind)
    fifo = _fifo(hf / name)
    out = tmp_path / "mc"
    argv = ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)]
    rc, _, err = _with_deadline(lambda: run(argv, capsys), fifo)
    assert_refused(rc, err, [str(fifo), "must be a regular file, found a FIFO"], out)


@pytest.mark.parametrize("name", [MANIFEST, "mp_rank_00/model.safetensors"])
def test_fifo_in_megatron_checkpoint_is_refused(ckpt, tmp_path, capsys, name):
    mc = ckpt("mc")
    fifo = _fifo(mc / name)
    out = tmp_path / "o"
    rc, _, err = _with_deadline(lambda: mcore_to_hf(mc, out, capsys), fifo)
    assert_refused(rc, err, [str(fifo), "must be a regular file, found a FIFO"], out)


@pytest.mark.parametrize("name", [".metadata", "distcp", MANIFEST])
def test_fifo_in_torch_dist_checkpoint_is_refused(ckpt, tmp_path, capsys, name):
    td = ckpt("td")
    path = sorted(td.glob("*.distcp"))[0] if name == "distcp" else td / name
    fifo = _fifo(path)
    out = tmp_path / "o"
    rc, _, err = _with_deadline(lambda: mcore_to_hf(td, out, capsys), fifo)
    assert_refused(rc, err, [str(fifo), "must be a regular file, found a FIFO"], out)


# ---- safetensors index names ----------------------------------------------------------------------------


def _rename_shard_in_index(hf: Path, new_name: str) -> None:
    index = hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    old = "model-00002-of-00002.safetensors"
    data["weight_map"] = {k: (new_name if v == old else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_index_shard_name_outside_the_checkpoint_is_refused(ckpt, tmp_path, capsys, how):
    hf = ckpt("sharded")
    outside = tmp_path / "elsewhere" / "model-00002-of-00002.safetensors"
    outside.parent.mkdir()
    shutil.copy(hf / "model-00002-of-00002.safetensors", outside)
    name = "../elsewhere/model-00002-of-00002.safetensors" if how == "dotdot" else str(outside)
    _rename_shard_in_index(hf, name)
    out = tmp_path / "mc"
    rc, _, err = run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)], capsys)
    assert_refused(
        rc, err, [str(hf / "model.safetensors.index.json"), repr(name), "leaves the checkpoint"], out
    )


def test_symlinked_shards_are_followed(ckpt, tmp_path, capsys):
    """HF cache snapshots link every file to a blob elsewhere: the link is followed, the name is inside."""
    hf = ckpt("sharded")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for p in sorted(hf.iterdir()):
        blob = blobs / p.name
        shutil.move(p, blob)
        p.symlink_to(blob)
    out = tmp_path / "mc"
    assert run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)], capsys)[0] == 0
    back = tmp_path / "back"
    assert mcore_to_hf(out, back, capsys)[0] == 0
    want = {k: v for k, v in stored_tensors(blobs).items()}
    got = {k: v for k, v in stored_tensors(back).items()}
    assert state_dict_failures(got, want) == []


def test_symlinked_shard_to_a_fifo_is_refused(ckpt, tmp_path, capsys):
    hf = ckpt("sharded")
    fifo = _fifo(tmp_path / "blob")
    shard = hf / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(fifo)
    out = tmp_path / "mc"
    argv = ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)]
    rc, _, err = _with_deadline(lambda: run(argv, capsys), fifo)
    assert_refused(rc, err, [str(shard), "must be a regular file, found a FIFO"], out)


# ---- defect 12: --hf-config must agree with the manifest ---------------------------------------------


def test_hf_config_contradicting_the_manifest_is_refused(built, ckpt, tmp_path, capsys):
    """Before: --hf-config was silently ignored for per-rank checkpoints (exit 0, manifest's config used)."""
    mc = ckpt("mc")
    cfg = json.loads((built["hf"] / "config.json").read_text())
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(cfg | {"intermediate_size": 96, "rms_norm_eps": 1e-3}))
    out = tmp_path / "o"
    rc, _, err = mcore_to_hf(mc, out, capsys, "--hf-config", str(wrong))
    assert_refused(
        rc, err, [f"--hf-config {wrong}", str(mc / MANIFEST), "intermediate_size", "rms_norm_eps"], out
    )


def test_hf_config_agreeing_with_the_manifest_is_accepted_with_a_note(built, ckpt, tmp_path, capsys):
    mc = ckpt("mc")
    out = tmp_path / "o"
    rc, stdout, err = mcore_to_hf(mc, out, capsys, "--hf-config", str(built["hf"] / "config.json"))
    assert rc == 0, err
    assert "--hf-config" in stdout and "agrees with" in stdout
    assert state_dict_failures(stored_tensors(out), stored_tensors(built["hf"])) == []


def test_torch_dist_hf_config_contradicting_its_manifest_is_refused(built, ckpt, tmp_path, capsys):
    td = ckpt("td")
    cfg = json.loads((built["hf"] / "config.json").read_text())
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(cfg | {"final_logit_softcapping": 12.5}))
    out = tmp_path / "o"
    rc, _, err = mcore_to_hf(td, out, capsys, "--hf-config", str(wrong))
    assert_refused(rc, err, [f"--hf-config {wrong}", str(td / MANIFEST), "final_logit_softcapping"], out)


# ---- strict JSON everywhere ---------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


JSON_FILES = {
    "config.json": ("hf", "config.json"),
    "index": ("sharded", "model.safetensors.index.json"),
    "manifest": ("mc", MANIFEST),
    "torch_dist manifest": ("td", MANIFEST),
}


def _convert(kind: str, directory: Path, out: Path, capsys) -> tuple[int, str, str]:
    if kind in ("hf", "sharded"):
        return run(["convert", "hf-to-mcore", "--hf", str(directory), "--out", str(out)], capsys)
    return mcore_to_hf(directory, out, capsys)


@pytest.mark.parametrize("which", sorted(JSON_FILES))
@pytest.mark.parametrize("bad", ["deep", "nan", "infinity"])
def test_hostile_json_is_refused(ckpt, tmp_path, capsys, which, bad):
    """Before: a deep document raised RecursionError (traceback); NaN/Infinity were accepted."""
    kind, name = JSON_FILES[which]
    directory = ckpt(kind)
    path = directory / name
    if bad == "deep":
        path.write_text(DEEP)
        needles = ["nested too deeply"]
    else:
        data = json.loads(path.read_text())
        literal = "NaN" if bad == "nan" else "-Infinity"
        if which == "index":
            data["metadata"]["total_size"] = "@"
        else:
            cfg = data if which == "config.json" else data["hf_config"]
            cfg["initializer_range"] = "@"
        path.write_text(json.dumps(data).replace('"@"', literal))
        needles = ["non-finite number", literal]
    out = tmp_path / "o"
    rc, _, err = _convert(kind, directory, out, capsys)
    assert_refused(rc, err, [str(path), *needles], out)


@pytest.mark.parametrize("bad", ["deep", "nan"])
def test_hostile_json_in_a_safetensors_header_is_refused(ckpt, tmp_path, capsys, bad):
    hf = ckpt("hf")
    path = hf / "model.safetensors"
    if bad == "deep":
        header = DEEP.encode()
    else:
        header = b'{"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    out = tmp_path / "mc"
    rc, _, err = run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)], capsys)
    assert_refused(rc, err, [str(path), "safetensors header"], out)


@pytest.mark.parametrize("bad", ["deep", "nan"])
def test_hostile_config_for_weight_sync_and_loader_is_refused(built, tmp_path, bad):
    """slime's streaming converter and loader read ``config.json`` from a path too."""
    from gemma4.slime.loader import gemma4_hf_tensor
    from gemma4.slime.weight_sync import convert_gemma4_to_hf
    from harness.testing.conversion import slime_args

    cfg_path = tmp_path / "config.json"
    if bad == "deep":
        cfg_path.write_text(DEEP)
        needle = "nested too deeply"
    else:
        cfg = json.loads((built["hf"] / "config.json").read_text())
        cfg["initializer_range"] = "@"
        cfg_path.write_text(json.dumps(cfg).replace('"@"', "NaN"))
        needle = "non-finite number"
    name = "module.decoder.final_layernorm.weight"
    with pytest.raises(InvalidInputError, match=needle) as exc:
        convert_gemma4_to_hf(slime_args(hf_checkpoint=str(tmp_path)), name, torch.zeros(1))
    assert str(cfg_path) in str(exc.value)
    with pytest.raises(InvalidInputError, match=needle) as exc:
        gemma4_hf_tensor(name, lambda n: torch.zeros(1), str(cfg_path))
    assert str(cfg_path) in str(exc.value)

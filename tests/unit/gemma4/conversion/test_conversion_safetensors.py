"""Our streaming safetensors reader/writer against the ``safetensors`` library, and its refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gemma4.conversion.safetensors_io import (
    Entry,
    SafetensorsDir,
    SafetensorsWriter,
    ShardedWriter,
    read_header,
    read_tensor,
)
from gemma4.errors import InvalidInputError


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b": torch.randn(7, generator=gen),
        "c.scalar": torch.tensor([1.25], dtype=torch.float64),
        "d.half": torch.randn(2, 3, generator=gen).half(),
        "e.empty": torch.zeros(0, 4),
    }


def test_library_file_reads_bit_exact(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "x.safetensors")
    infos, meta = read_header(tmp_path / "x.safetensors")
    assert sorted(infos) == sorted(ts)
    for k, t in ts.items():
        got = read_tensor(infos[k])
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_our_file_reads_in_the_library_bit_exact(tmp_path):
    """Tensors written out of order land where the header says; the library (and HF) can read them."""
    ts = _tensors()
    path = tmp_path / "y.safetensors"
    w = SafetensorsWriter(path, [Entry(k, t.dtype, tuple(t.shape)) for k, t in ts.items()])
    for k in reversed(list(ts)):
        w.write(k, ts[k])
    assert w.missing() == []
    back = load_file(path)
    assert sorted(back) == sorted(ts)
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_refuses_unplanned_or_mismatched_tensors(tmp_path):
    w = SafetensorsWriter(tmp_path / "z.safetensors", [Entry("a", torch.float32, (2,))])
    with pytest.raises(KeyError):
        w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        w.write("a", torch.zeros(2))


def test_sharded_writer_splits_and_indexes(tmp_path):
    ts = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    w = ShardedWriter(
        tmp_path / "out", [Entry(k, t.dtype, (256,)) for k, t in ts.items()], max_shard_bytes=2048
    )
    for k, t in ts.items():
        w.write(k, t)
    w.finish()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    store = SafetensorsDir(tmp_path / "out")
    for k, t in ts.items():
        assert torch.equal(store.read(k), t)


def _corrupt(path, how):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if how == "truncated":
        path.write_bytes(raw[:-3])
    elif how == "short":
        path.write_bytes(raw[:5])
    elif how == "header-length":
        path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    elif how == "json":
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])
    elif how == "dtype":
        path.write_bytes(raw[:8] + raw[8 : 8 + n].replace(b'"F32"', b'"X32"') + raw[8 + n :])
    elif how == "offsets":
        header = json.loads(raw[8 : 8 + n])
        header["w"]["data_offsets"] = [0, 8]
        new = json.dumps(header).encode()
        new += b" " * (n - len(new))
        path.write_bytes(raw[:8] + new[:n] + raw[8 + n :])


@pytest.mark.parametrize("how", ["truncated", "short", "header-length", "json", "dtype", "offsets"])
def test_corrupted_files_are_refused_naming_the_file(tmp_path, how):
    """Catches: reading past the end, trusting a header that does not describe the data."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4, 4), "v": torch.ones(3)}, path)
    _corrupt(path, how)
    with pytest.raises(InvalidInputError) as exc:
        read_header(path)
    assert str(path) in str(exc.value)
    if how == "truncated":
        assert "'w'" in str(exc.value) or "'v'" in str(exc.value)


@pytest.mark.parametrize(
    "index, needle",
    [
        ("{not json", "unreadable safetensors index"),
        (json.dumps({"weight_map": {"w": "missing.safetensors"}}), "does not exist"),
        (json.dumps({"weight_map": {"w": "a.safetensors", "ghost": "a.safetensors"}}), "'ghost'"),
        (json.dumps({"weight_map": {"w": "a.safetensors"}}), "does not list tensor 'v'"),
        (json.dumps({"weight_map": ["a.safetensors"]}), "unreadable safetensors index"),
    ],
)
def test_bad_index_is_refused(tmp_path, index, needle):
    save_file({"w": torch.zeros(2), "v": torch.zeros(1)}, tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(InvalidInputError, match=needle):
        SafetensorsDir(tmp_path)


def test_duplicate_tensor_across_shards_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(InvalidInputError, match="'w' is also stored"):
        SafetensorsDir(tmp_path)

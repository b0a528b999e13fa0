"""Streaming safetensors reading and writing: one tensor at a time, no mmap, no pickle.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data buffer. Reading parses and validates the header up front (known dtype, sizes that match the shape,
offsets inside the file, no holes or overlaps), so a truncated or corrupted file is refused before anything
is converted, naming the file and the tensor. Tensors are read with plain ``readinto`` (the page cache is
not charged to the process, unlike an mmap), and written with ``seek`` + ``write`` into a file whose header
is planned in advance, so a converter holds only the tensor in hand.

Directories: a single ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {name: file}}``). Hostile input (:mod:`gemma4.safe_read`): every file
read must be a regular file (a FIFO named ``model.safetensors`` is refused, not waited on; symlinks are
followed, as HF caches link snapshots to blobs), a shard named by the index must be lexically inside the
directory (no ``..``, no absolute path), and JSON (index, headers) is parsed strictly (no ``NaN``, bounded
nesting).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma4.errors import InvalidInputError
from gemma4.safe_read import loads_json, path_inside, read_json_object, require_regular_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def read_checkpoint_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object read strictly from a checkpoint file (:func:`gemma4.safe_read.read_json_object`);
    errors read ``{path}: unreadable {what} (why)``."""
    try:
        return read_json_object(path, what)
    except InvalidInputError as exc:
        msg, prefix = str(exc), f"{path}: "
        raise InvalidInputError(f"{path}: unreadable {what} ({msg.removeprefix(prefix)})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of one safetensors file. Errors name the file (and the tensor)."""
    path = require_regular_file(path, "safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InvalidInputError(f"{path}: not a safetensors file (truncated: {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InvalidInputError(
                    f"{path}: corrupted or truncated safetensors header (claims {n} header bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read safetensors file ({exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: corrupted safetensors header (not UTF-8: {exc})") from None
    header = loads_json(text, f"{path}: corrupted safetensors header")
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"{path}: corrupted safetensors header ('__metadata__' is not an object)")
    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            if not isinstance(entry["shape"], list) or not isinstance(entry["data_offsets"], list):
                raise TypeError
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(_is_int(x) for x in (*shape, begin, end)) or any(s < 0 for s in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"{path}: corrupted safetensors header entry for tensor {name!r} ({entry!r:.200})"
            ) from exc
        if not 0 <= begin <= end or end - begin != _numel(shape) * _itemsize(dtype):
            raise InvalidInputError(
                f"{path}: corrupted safetensors header: tensor {name!r} has offsets [{begin}, {end}) "
                f"for shape {list(shape)} {entry['dtype']}"
            )
        if end > data_len:
            raise InvalidInputError(
                f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to {end} of the data "
                f"buffer, the file has {data_len}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    covered = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin - data_start != covered:
            raise InvalidInputError(
                f"{path}: corrupted safetensors header: tensor {info.name!r} starts at "
                f"{info.begin - data_start}, expected {covered} (holes or overlapping tensors)"
            )
        covered = info.end - data_start
    if covered != data_len:
        raise InvalidInputError(
            f"{path}: corrupted safetensors file: {data_len - covered} bytes after the last tensor"
        )
    return infos, {str(k): str(v) for k, v in metadata.items()}


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh memory."""
    out = torch.empty(_numel(info.shape), dtype=info.dtype)
    if info.nbytes:
        buf = out.view(torch.uint8).numpy()
        try:
            with open(info.path, "rb") as f:
                f.seek(info.begin)
                got = f.readinto(buf)
        except OSError as exc:
            raise InvalidInputError(f"{info.path}: cannot read tensor {info.name!r} ({exc})") from exc
        if got != info.nbytes:
            raise InvalidInputError(
                f"{info.path}: truncated while reading tensor {info.name!r} ({got} of {info.nbytes} bytes)"
            )
    return out.reshape(info.shape)


def same_bytes(a: TensorInfo, b: TensorInfo, block: int = 64 * 1024 * 1024) -> bool:
    """True if two stored tensors have the same dtype, shape and bytes (compared in blocks)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        fa.seek(a.begin)
        fb.seek(b.begin)
        left = a.nbytes
        while left:
            n = min(block, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


# ---- directories ------------------------------------------------------------------------------------


class SafetensorsDir:
    """All tensors of a safetensors checkpoint directory, by name, read on demand."""

    def __init__(self, directory: Path, what: str = "checkpoint") -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InvalidInputError(f"{self.directory}: {what} directory not found")
        self.index_path: Path | None = None
        self.files = self._files()
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for path in self.files:
            infos, meta = read_header(path)
            self.metadata[path] = meta
            for name, info in infos.items():
                if name in self.tensors:
                    raise InvalidInputError(
                        f"{path}: tensor {name!r} is also stored in {self.tensors[name].path.name}"
                    )
                self.tensors[name] = info
        if self.index_path is not None:
            self._check_index()

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if os.path.lexists(index):
            self.index_path = index
            data = read_checkpoint_json(index, "safetensors index")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise InvalidInputError(
                    f"{index}: unreadable safetensors index ('weight_map' must map tensor names to file names)"
                )
            self._weight_map = weight_map
            self._shard_paths: dict[str, Path] = {}
            paths: dict[Path, None] = {}
            for name in sorted(set(weight_map.values())):
                p = path_inside(self.directory, name, f"{index}: weight_map")
                if not os.path.lexists(p):
                    raise InvalidInputError(f"{index}: names shard {name!r}, which does not exist")
                self._shard_paths[name] = require_regular_file(p, "safetensors shard")
                paths[p] = None
            return list(paths)
        single = self.directory / SINGLE_FILE
        if os.path.lexists(single):
            return [require_regular_file(single, "safetensors file")]
        found = sorted(self.directory.glob("*.safetensors"))
        if not found:
            raise InvalidInputError(
                f"{self.directory}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})"
            )
        return [require_regular_file(p, "safetensors file") for p in found]

    def _check_index(self) -> None:
        for name, fname in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise InvalidInputError(
                    f"{self.index_path}: lists tensor {name!r} in {fname}, which lacks it"
                )
            if info.path != self._shard_paths[fname]:
                where = info.path.relative_to(self.directory)
                raise InvalidInputError(
                    f"{self.index_path}: lists tensor {name!r} in {fname}, but it is in {where}"
                )
        unlisted = sorted(set(self.tensors) - set(self._weight_map))
        if unlisted:
            info = self.tensors[unlisted[0]]
            raise InvalidInputError(
                f"{self.index_path}: does not list tensor {unlisted[0]!r} of {info.path.relative_to(self.directory)}"
            )

    def read(self, name: str) -> torch.Tensor:
        """Read tensor ``name``."""
        return read_tensor(self.tensors[name])


# ---- writing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A planned tensor: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are planned up front and supplied in any order.

    The layout is the official writer's (tensors sorted by dtype size, then name); the header is written at
    once and every tensor is ``seek``-written into place, so nothing but the tensor in hand is held.
    """

    def __init__(self, path: Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        order = sorted(self.entries.values(), key=lambda e: (-_itemsize(e.dtype), e.name))
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.offsets: dict[str, int] = {}
        pos = 0
        for e in order:
            header[e.name] = {
                "dtype": DTYPE_NAMES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [pos, pos + e.nbytes],
            }
            self.offsets[e.name] = pos
            pos += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + pos
        self.written: set[str] = set()
        self.parts: dict[str, int] = {}
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write planned tensor ``name``; dtype and shape must match the plan."""
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{self.path}: tensor {name!r} is not planned")
        if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned {e.dtype} {e.shape}"
            )
        if name in self.written:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        if e.nbytes:
            buf = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            with open(self.path, "r+b") as f:
                f.seek(self.data_start + self.offsets[name])
                f.write(memoryview(buf))
        self.written.add(name)

    def write_part(self, name: str, part: torch.Tensor, byte_offset: int) -> None:
        """Write a leading-dim slice of planned tensor ``name`` at ``byte_offset`` into its bytes (for tensors
        gathered from row shards without concatenating them). The tensor counts as written once complete."""
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{self.path}: tensor {name!r} is not planned")
        if part.dtype != e.dtype or tuple(part.shape[1:]) != e.shape[1:]:
            raise ValueError(
                f"{self.path}: part of {name!r} is {part.dtype} {tuple(part.shape)}, planned {e}"
            )
        buf = part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        done = self.parts.get(name, 0)
        if byte_offset != done or done + buf.nbytes > e.nbytes:
            raise ValueError(
                f"{self.path}: part of {name!r} at byte {byte_offset} does not continue at {done}"
            )
        with open(self.path, "r+b") as f:
            f.seek(self.data_start + self.offsets[name] + byte_offset)
            f.write(memoryview(buf))
        self.parts[name] = done + buf.nbytes
        if self.parts[name] == e.nbytes:
            self.written.add(name)

    def missing(self) -> list[str]:
        """Planned tensors not written yet."""
        return sorted(set(self.entries) - self.written)


class ShardedWriter:
    """A checkpoint directory of safetensors shards (+ index when more than one), planned up front.

    Entries are packed into shards of at most ``max_shard_bytes`` in plan order (one larger tensor gets
    a shard of its own); the names follow HF: ``model.safetensors`` or ``model-00001-of-00003.safetensors``.
    """

    def __init__(self, directory: Path, entries: Sequence[Entry], max_shard_bytes: int = 5 * 1024**3) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        groups: list[list[Entry]] = [[]]
        size = 0
        for e in entries:
            if groups[-1] and size + e.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e.nbytes
        n = len(groups)
        self.writers: list[SafetensorsWriter] = []
        self.route: dict[str, SafetensorsWriter] = {}
        weight_map: dict[str, str] = {}
        for i, group in enumerate(groups):
            fname = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            w = SafetensorsWriter(self.directory / fname, group)
            self.writers.append(w)
            for e in group:
                self.route[e.name] = w
                weight_map[e.name] = fname
        if n > 1:
            total = sum(e.nbytes for e in entries)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write planned tensor ``name`` into its shard."""
        if name not in self.route:
            raise KeyError(f"{self.directory}: tensor {name!r} is not planned")
        self.route[name].write(name, tensor)

    def write_part(self, name: str, part: torch.Tensor, byte_offset: int) -> None:
        """Write a leading-dim slice of ``name`` (see :meth:`SafetensorsWriter.write_part`)."""
        if name not in self.route:
            raise KeyError(f"{self.directory}: tensor {name!r} is not planned")
        self.route[name].write_part(name, part, byte_offset)

    def finish(self) -> None:
        """Check that every planned tensor was written (a converter bug otherwise)."""
        missing = [m for w in self.writers for m in w.missing()]
        if missing:
            raise RuntimeError(
                f"{self.directory}: converter did not write {missing[:5]} ({len(missing)} in all)"
            )
        for w in self.writers:
            with open(w.path, "r+b") as f:
                os.fsync(f.fileno())

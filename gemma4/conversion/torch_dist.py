"""Megatron ``torch_dist`` (``megatron.core.dist_checkpointing``) checkpoints: written by Megatron's own
``dist_checkpointing.save``, read back without unpickling arbitrary objects.

**Layout.** Gemma 4 layers are heterogeneous (full layers have their own head dim and KV heads, so their
``linear_qkv``/``linear_proj`` shapes differ), which breaks Megatron's default layer-stacked sharded tensors
(one key ``decoder.layers.self_attention.linear_qkv.weight`` with a leading layer axis; facts §6.18). We use
Megatron's own non-homogeneous layout instead: **one key per layer**, ``decoder.layers.{L}.…``, exactly the
keys ``Gemma4Model.sharded_state_dict()`` produces when the model is built with
``hetereogenous_dist_checkpoint=True`` (Megatron's spelling). The checkpoint is written by Megatron from
that model (:func:`save_torch_dist`), so every key is Megatron's own; global tensors are the TP = 1 tensors
(fc1 = ``[gate; up]``, qkv per-group interleaved, experts stacked [E, ...]), resharded to any TP/EP at load.

**Reading** (``mcore-to-hf`` on a ``torch_dist`` directory, ours or one Megatron training saved): the DCP
``.metadata`` file is a pickle; it is read with an allow-list unpickler that admits only the plain data
classes of ``torch.distributed.checkpoint`` (the same safety rule as ``torch.load(weights_only=True)``), and
every tensor item is read with ``torch.load(weights_only=True)`` from its byte range, one tensor at a time.
Before any data is read, every storage entry of the metadata is checked: its ``relative_path`` is lexically
inside the checkpoint (no ``..``, not absolute: DCP's own ``FileSystemReader.read_data`` joins it to the
checkpoint directory as given, so an absolute path or ``..`` would be followed), names a regular file
(symlinks followed), and its byte range lies inside that file. ``common.pt`` (pickled training args) is never
read: the model config comes from our manifest or ``--hf-config``. :func:`load_torch_dist_into_model` runs
the same checks before handing the directory to Megatron (whose DCP reader unpickles ``.metadata`` without
an allow-list).

**Cost.** ``dist_checkpointing.save`` needs the whole model in memory (one save call writes one checkpoint;
we build the Megatron model and fill it rule by rule) and starts a ``spawn`` multiprocessing manager (about 3 s; the calling program needs an
``if __name__ == "__main__"`` guard, which the console script has). Use the default per-rank safetensors
layout where memory matters; use this one to feed Megatron's ``--load``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.conversion import mapping
from gemma4.errors import InvalidInputError
from gemma4.safe_read import path_inside, read_json_object, require_regular_file

METADATA = ".metadata"
MEGATRON_METADATA = "metadata.json"

_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
}
_SAFE_GLOBALS |= {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}
_SAFE_DTYPES = {
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
}


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickles only the plain data classes a DCP ``.metadata`` file is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and name in _SAFE_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def is_torch_dist(directory: Path) -> bool:
    """True if ``directory`` holds a ``torch_dist`` checkpoint (``.metadata`` + Megatron's ``metadata.json``)."""
    return os.path.lexists(Path(directory) / METADATA)


def save_torch_dist(src: Any, directory: Path) -> None:
    """Write the HF checkpoint ``src`` (a validated :class:`~gemma4.conversion.hf_io.HFSource`) as a
    ``torch_dist`` checkpoint through Megatron itself: build the TP = 1 model with per-layer keys, copy every
    tensor in through the table (one rule at a time), then ``dist_checkpointing.save(
    model.sharded_state_dict())``. Megatron therefore writes its own keys for everything (experts stacked
    as ``mlp.experts.experts.linear_fc*.weight`` [E, ...], GLU halves, linears' ``_extra_state``)."""
    from megatron.core import dist_checkpointing

    from gemma4.model.build import build_gemma4_model

    spec = src.spec
    model = build_gemma4_model(spec, src.dtype, hetereogenous_dist_checkpoint=True)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    done: set[str] = set()
    with torch.no_grad():
        for rule, layer in mapping.bound_rules(spec):
            w = mapping.rule_to_mcore(rule, [src.read(n) for n in rule.hf], spec, layer)
            items = (
                [(rule.mcore.format(e=e), t) for e, t in enumerate(w)]
                if rule.is_expert
                else [(rule.mcore, w)]
            )
            for name, t in items:
                target = own.get(name)
                if target is None or tuple(target.shape) != tuple(t.shape):
                    raise InvalidInputError(
                        f"tensor {name!r} does not fit the Megatron model (a converter bug)"
                    )
                target.copy_(t)
                done.add(name)
    missing = sorted(set(own) - done)
    if missing:
        raise InvalidInputError(f"the table does not cover the Megatron model: {missing[:5]}")
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


_LOCAL_EXPERT = re.compile(
    r"^(?P<head>.*\.mlp\.experts)\.local_experts\.(?P<e>\d+)\.(?P<tail>linear_fc[12]\.weight)$"
)


def torch_dist_key(name: str) -> tuple[str, int | None]:
    """Megatron state-dict name -> (``torch_dist`` key, expert row). SequentialMLP experts are checkpointed
    stacked: ``…mlp.experts.local_experts.{e}.linear_fc1.weight`` is row ``e`` of
    ``…mlp.experts.experts.linear_fc1.weight`` [E, ...]."""
    m = _LOCAL_EXPERT.match(name)
    if m is None:
        return name, None
    return f"{m.group('head')}.experts.{m.group('tail')}", int(m.group("e"))


def load_torch_dist_into_model(model: torch.nn.Module, directory: Path) -> None:
    """Megatron's own load: ``dist_checkpointing.load(model.sharded_state_dict(), dir)``. The model must be
    built with ``hetereogenous_dist_checkpoint=True`` (per-layer keys)."""
    from megatron.core import dist_checkpointing

    if not getattr(model.config, "hetereogenous_dist_checkpoint", False):
        raise InvalidInputError(
            "build the model with hetereogenous_dist_checkpoint=True to load a Gemma 4 torch_dist checkpoint"
        )
    check_torch_dist_files(directory)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state, strict=True)


def check_torch_dist_files(directory: Path) -> None:
    """Everything Megatron's ``dist_checkpointing.load`` reads, checked before it runs: ``.metadata``
    unpickles through the allow-list and every ``relative_path`` in it stays inside ``directory`` and names
    a regular file holding its byte range; ``metadata.json`` is strict JSON; ``common.pt`` is a regular
    file."""
    directory = Path(directory)
    TorchDistReader.open(directory)
    if os.path.lexists(directory / MEGATRON_METADATA):
        read_json_object(directory / MEGATRON_METADATA, "Megatron dist_checkpointing metadata")
    if os.path.lexists(directory / "common.pt"):
        require_regular_file(directory / "common.pt", "Megatron common state")


# ---- reading without Megatron ---------------------------------------------------------------------------


class _FileSlice(io.RawIOBase):
    """A seekable read-only view of ``[offset, offset + length)`` of a file, for ``torch.load``."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _check_storage(directory: Path, metadata_path: Path, storage: dict[Any, Any]) -> None:
    """Every storage entry: ``relative_path`` lexically inside ``directory`` and a regular file (symlinks
    followed), ``[offset, offset + length)`` inside it. Errors name ``.metadata``, the
    tensor and the file."""
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        key = getattr(index, "fqn", index)
        rel = getattr(info, "relative_path", None)
        where = f"{metadata_path}: relative_path of tensor {key!r}"
        path = path_inside(directory, rel, where)
        if rel not in sizes:
            sizes[rel] = require_regular_file(path, f"storage of tensor {key!r}").stat().st_size
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (offset, length)):
            raise InvalidInputError(
                f"{metadata_path}: storage of tensor {key!r} has offset {offset!r}, length {length!r}; "
                "expected non-negative integers"
            )
        if offset + length > sizes[rel]:
            raise InvalidInputError(
                f"{metadata_path}: storage of tensor {key!r} at bytes [{offset}, {offset + length}) of "
                f"{rel!r} lies beyond the end of that file ({sizes[rel]} bytes)"
            )


@dataclass
class TorchDistReader:
    """Global tensors of a ``torch_dist`` checkpoint by key, assembled from their chunks on demand."""

    directory: Path
    tensors: dict[str, Any] = field(default_factory=dict)  # key -> TensorStorageMetadata
    storage: dict[Any, Any] = field(default_factory=dict)  # MetadataIndex -> _StorageInfo

    @classmethod
    def open(cls, directory: Path) -> TorchDistReader:
        """Unpickle ``.metadata`` (allow-list) and check every storage entry before any data is read."""
        directory = Path(directory)
        path = require_regular_file(directory / METADATA, "torch_dist metadata")
        try:
            with open(path, "rb") as f:
                meta = _AllowListUnpickler(f).load()
        except (
            OSError,
            pickle.UnpicklingError,
            EOFError,
            AttributeError,
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            RecursionError,
            MemoryError,
        ) as exc:
            raise InvalidInputError(f"{path}: unreadable torch_dist metadata ({exc})") from None
        from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

        if (
            not isinstance(meta, Metadata)
            or not isinstance(meta.state_dict_metadata, dict)
            or not isinstance(meta.storage_data or {}, dict)
        ):
            raise InvalidInputError(f"{path}: not torch.distributed.checkpoint metadata")
        tensors = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        storage = dict(meta.storage_data or {})
        _check_storage(directory, path, storage)
        return cls(directory, tensors, storage)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str) -> torch.Tensor:
        """Assemble global tensor ``key`` from its stored chunks (each read with ``weights_only=True``)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self.tensors[key]
        out: torch.Tensor | None = None
        for chunk in md.chunks:
            info = self.storage.get(MetadataIndex(key, chunk.offsets))
            if info is None or getattr(info, "transform_descriptors", None):
                raise InvalidInputError(
                    f"{self.directory}: chunk {list(chunk.offsets)} of {key!r} is not readable"
                )
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if (
                len(offsets) != len(md.size)
                or len(sizes) != len(md.size)
                or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, md.size))
            ):
                raise InvalidInputError(
                    f"{self.directory / METADATA}: chunk at {list(offsets)} of size {list(sizes)} does not fit "
                    f"tensor {key!r} of shape {list(md.size)}"
                )
            path = self.directory / info.relative_path
            try:
                with open(path, "rb") as f:
                    piece = torch.load(
                        _FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True
                    )
            except Exception as exc:  # torch raises several types for damaged zip records
                raise InvalidInputError(f"{path}: cannot read {key!r} ({exc})") from exc
            if tuple(piece.shape) != tuple(chunk.sizes):
                raise InvalidInputError(
                    f"{path}: chunk of {key!r} has shape {list(piece.shape)}, metadata says {list(chunk.sizes)}"
                )
            if tuple(chunk.sizes) == tuple(md.size):
                return piece
            if out is None:
                out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            region = out
            for dim, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes)):
                region = region.narrow(dim, o, n)
            region.copy_(piece)
            del piece
        if out is None:
            raise InvalidInputError(f"{self.directory}: tensor {key!r} has no stored chunks")
        return out

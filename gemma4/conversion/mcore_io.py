"""The Megatron checkpoint layout this project writes and reads: per-rank safetensors + a JSON manifest.

::

    OUT/
      gemma4_mcore.json                     manifest: format, version, tp, ep, dtype, the HF text config
      mp_rank_00/model.safetensors          TP rank 0 (EP > 1: mp_rank_{tp:02d}_{ep:03d})
      mp_rank_01/model.safetensors          ...

Each rank file holds exactly that rank's ``Gemma4Model.state_dict()`` (names as Megatron's ``GPTModel``
has them, TP-local shards, experts by local index, ``_extra_state`` left out), so a rank loads it with
``load_state_dict`` after a safetensors read. Large ranks are sharded like HF (``model-0000i-of-0000n``
+ ``model.safetensors.index.json``). Why this and not Megatron's ``torch_dist``: see the README section
"Weight conversion" (reading ``torch_dist`` unpickles, and saving it needs the whole model in memory).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.config import Gemma4TextSpec, hf_text_config_from_dict, read_hf_config, text_spec_from_hf
from gemma4.conversion import mapping, sharding
from gemma4.conversion.manifest import FORMAT, FORMAT_TORCH_DIST, MANIFEST, VERSION
from gemma4.conversion.safetensors_io import (
    Entry,
    SafetensorsDir,
    TensorInfo,
    read_checkpoint_json,
    read_tensor,
    same_bytes,
)
from gemma4.conversion.torch_dist import TorchDistReader, is_torch_dist, torch_dist_key
from gemma4.errors import ConfigError, InvalidInputError

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

Rank = tuple[int, int]  # (tp_rank, ep_rank)


def rank_dir_name(tp_rank: int, ep_rank: int, ep: int) -> str:
    """``mp_rank_{tp:02d}`` (``_{ep:03d}`` appended when expert parallelism is on)."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{ep_rank:03d}" if ep > 1 else "")


def ranks(tp: int, ep: int) -> list[Rank]:
    """All (tp_rank, ep_rank) pairs in directory order."""
    return [(t, e) for t in range(tp) for e in range(ep)]


def split_rule(
    rule: mapping.Rule,
    layer: int | None,
    hf_tensors: list[torch.Tensor],
    spec: Gemma4TextSpec,
    tp: int,
    ep: int,
) -> dict[Rank, list[tuple[str, torch.Tensor]]]:
    """HF tensors of one rule -> the Megatron tensors each rank holds (names rank-local)."""
    w = mapping.rule_to_mcore(rule, hf_tensors, spec, layer)
    out: dict[Rank, list[tuple[str, torch.Tensor]]] = {r: [] for r in ranks(tp, ep)}
    if rule.is_expert:
        for ep_rank, items in enumerate(sharding.shard_experts(w, ep)):
            for local, t in items:
                name = rule.mcore.format(e=local)
                for tp_rank, s in enumerate(sharding.shard_tp(rule, t, tp, name)):
                    out[(tp_rank, ep_rank)].append((name, s))
    else:
        for tp_rank, s in enumerate(sharding.shard_tp(rule, w, tp)):
            for ep_rank in range(ep):
                out[(tp_rank, ep_rank)].append((rule.mcore, s))
    return out


def gather_rule(
    rule: mapping.Rule,
    layer: int | None,
    read: Callable[[Rank, str], torch.Tensor],
    spec: Gemma4TextSpec,
    tp: int,
    ep: int,
) -> list[tuple[str, torch.Tensor]]:
    """Rank tensors of one rule -> its HF ``(relative name, tensor)`` pairs. Inverse of :func:`split_rule`."""
    if rule.is_expert:
        num = int(spec.num_experts)  # type: ignore[attr-defined]
        per_rank = []
        for ep_rank in range(ep):
            local = []
            for i in range(num // ep):
                name = rule.mcore.format(e=i)
                local.append(sharding.gather_tp(rule, [read((t, ep_rank), name) for t in range(tp)], name))
            per_rank.append(local)
        w: Any = sharding.gather_experts(per_rank, num)
    else:
        w = sharding.gather_tp(rule, [read((t, 0), rule.mcore) for t in range(tp)])
    return mapping.rule_to_hf(rule, w, spec, layer)


def plan(spec: Gemma4TextSpec, dtype: torch.dtype, tp: int, ep: int) -> dict[Rank, list[Entry]]:
    """Every rank's tensors (name, dtype, shape) in write order, derived from the table on meta tensors."""
    out: dict[Rank, list[Entry]] = {r: [] for r in ranks(tp, ep)}
    for rule, layer in mapping.bound_rules(spec):
        metas = [torch.empty(mapping.hf_shape(n, spec, layer), dtype=dtype, device="meta") for n in rule.hf]
        for rank, items in split_rule(rule, layer, metas, spec, tp, ep).items():
            out[rank] += [Entry(name, dtype, tuple(t.shape)) for name, t in items]
    return out


def hf_plan(
    spec: Gemma4TextSpec, dtype: torch.dtype, prefix: str = mapping.HF_CAUSAL_LM_PREFIX
) -> list[Entry]:
    """The HF tensors (full names) an export writes, in checkpoint order."""
    out = []
    for rule, layer in mapping.bound_rules(spec):
        for n in rule.hf:
            full = n if n == "lm_head.weight" else prefix + n
            out.append(Entry(full, dtype, mapping.hf_shape(n, spec, layer)))
    return out


def manifest_dict(
    spec_config: Any, dtype: torch.dtype, tp: int, ep: int, source: dict[str, Any], fmt: str = FORMAT
) -> dict[str, Any]:
    """The JSON manifest of a checkpoint."""
    if fmt == FORMAT_TORCH_DIST:
        return {
            "format": fmt,
            "version": VERSION,
            "dtype": str(dtype).removeprefix("torch."),
            "names": (
                "Megatron dist_checkpointing (torch_dist), one key per layer (build the model with "
                "hetereogenous_dist_checkpoint=True); global TP=1 tensors, resharded by Megatron at load"
            ),
            "checked_for": {"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep},
            "hf_config": json.loads(spec_config.to_json_string(use_diff=False)),
            "source": source,
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "tensor_model_parallel_size": tp,
        "expert_model_parallel_size": ep,
        "pipeline_model_parallel_size": 1,
        "dtype": str(dtype).removeprefix("torch."),
        "ranks": {rank_dir_name(t, e, ep): {"tp_rank": t, "ep_rank": e} for t, e in ranks(tp, ep)},
        "names": (
            "each rank holds Gemma4Model.state_dict() of that rank: Megatron GPTModel names, TP-local shards, "
            "experts by local index, no _extra_state"
        ),
        "hf_config": json.loads(spec_config.to_json_string(use_diff=False)),
        "source": source,
    }


@dataclass
class MCoreSource:
    """A validated Megatron checkpoint in this layout."""

    directory: Path
    manifest: dict[str, Any]
    hf_config: Any
    spec: Gemma4TextSpec
    dtype: torch.dtype
    tp: int
    ep: int
    stores: dict[Rank, SafetensorsDir]
    notes: list[str] = field(default_factory=list)

    def info(self, rank: Rank, name: str) -> TensorInfo:
        """Where ``name`` of ``rank`` is stored."""
        return self.stores[rank].tensors[name]

    def read(self, rank: Rank, name: str) -> torch.Tensor:
        """Read ``name`` of ``rank``; tensors repeated on every EP rank must agree with EP rank 0."""
        tp_rank, ep_rank = rank
        info = self.info(rank, name)
        if ep_rank == 0 and self.ep > 1 and ".local_experts." not in name:
            for e in range(1, self.ep):
                other = self.info((tp_rank, e), name)
                if not same_bytes(info, other):
                    raise InvalidInputError(
                        f"{other.path}: tensor {name!r} differs from expert-parallel rank 0 ({info.path})"
                    )
        return read_tensor(info)


def _field(manifest: dict[str, Any], path: Path, key: str, kind: type) -> Any:
    v = manifest.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise InvalidInputError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return v


@dataclass
class TorchDistSource(MCoreSource):
    """A validated ``torch_dist`` checkpoint: one "rank" (0, 0) holding the global TP = 1 tensors."""

    reader: Any = None
    _stacked: Any = None  # (key, tensor): the stacked experts of the layer being read

    def read(self, rank: Rank, name: str) -> torch.Tensor:
        """Assemble global tensor ``name`` from its chunks (an expert is a row of its layer's stacked
        tensor, which is kept while that layer's experts are read in turn)."""
        key, row = torch_dist_key(name)
        if row is None:
            return self.reader.read(key)
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, self.reader.read(key))
        return self._stacked[1][row]


def _spec(hf_config: Any, source: str) -> Gemma4TextSpec:
    try:
        return text_spec_from_hf(hf_config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _manifest_hf_config(manifest: dict[str, Any], path: Path) -> Any:
    cfg = manifest.get("hf_config")
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"{path}: field 'hf_config' is missing or not an object")
    return hf_text_config_from_dict(cfg, source=f"{path}: field 'hf_config'")


def read_hf_config_flag(hf_config_path: Path) -> Any:
    """The text config of ``--hf-config`` (a ``config.json`` or its directory), read strictly."""
    hf = read_hf_config(hf_config_path, "--hf-config file")
    return hf.hf_text_config(source=f"--hf-config {hf.path}")


def spec_differences(a: Gemma4TextSpec, b: Gemma4TextSpec) -> list[str]:
    """The fields of two normalised text configs that differ: ``name (a vs b)`` each."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            out.append(f"{f.name} ({x!r:.80} vs {y!r:.80})")
    return out


def check_hf_config_flag(hf_config_path: Path | None, spec: Gemma4TextSpec, manifest_path: Path) -> list[str]:
    """``--hf-config`` given with a checkpoint whose manifest embeds the config: they must describe the same
    model (every field of the normalised text config: the weights' geometry and what the exported
    ``config.json`` carries), else :class:`InvalidInputError` naming the fields; if they agree, a note.
    Never silently ignored."""
    if hf_config_path is None:
        return []
    flag_spec = _spec(read_hf_config_flag(hf_config_path), f"--hf-config {hf_config_path}")
    diffs = spec_differences(flag_spec, spec)
    if diffs:
        raise InvalidInputError(
            f"--hf-config {hf_config_path} disagrees with the config in the manifest {manifest_path} (the one "
            f"the weights were converted with) on {len(diffs)} field(s): {'; '.join(diffs)} (--hf-config vs "
            "manifest); drop --hf-config or fix it"
        )
    return [
        f"--hf-config {hf_config_path} agrees with the manifest's config ({manifest_path}); the manifest's "
        "config is exported"
    ]


def _open_torch_dist(directory: Path, hf_config_path: Path | None) -> TorchDistSource:
    path = directory / MANIFEST
    flag_notes: list[str] = []
    if os.path.lexists(path):
        manifest = read_checkpoint_json(path, "manifest")
        hf_config = _manifest_hf_config(manifest, path)
        where = str(path)
        flag_notes = check_hf_config_flag(
            hf_config_path, _spec(hf_config, f"{path}: field 'hf_config'"), path
        )
    elif hf_config_path is not None:
        hf_config = read_hf_config_flag(hf_config_path)
        where = f"--hf-config {hf_config_path}"
    else:
        raise InvalidInputError(
            f"{directory}: a torch_dist checkpoint without {MANIFEST}; pass --hf-config with the model's config.json"
        )
    spec = _spec(hf_config, where)
    reader = TorchDistReader.open(directory)
    expected: dict[str, tuple[int, ...]] = {}
    for e in plan(spec, torch.float32, 1, 1)[(0, 0)]:
        key, row = torch_dist_key(e.name)
        expected[key] = e.shape if row is None else (max(row + 1, expected.get(key, (0,))[0]),) + e.shape
    dtype = None
    for key, shape in expected.items():
        if key not in reader.tensors:
            raise InvalidInputError(f"{directory}: tensor {key!r} is missing from the torch_dist checkpoint")
        if reader.shape(key) != shape:
            raise InvalidInputError(
                f"{directory}: tensor {key!r} has shape {list(reader.shape(key))}; {where} implies {list(shape)}"
            )
        dtype = dtype or reader.dtype(key)
        if reader.dtype(key) != dtype or not dtype.is_floating_point:
            raise InvalidInputError(
                f"{directory}: tensor {key!r} has dtype {reader.dtype(key)}, others {dtype}"
            )
    notes = [f"torch_dist checkpoint {directory}"] + flag_notes
    return TorchDistSource(directory, {}, hf_config, spec, dtype, 1, 1, {}, notes, reader)


def open_mcore_checkpoint(directory: Path, hf_config_path: Path | None = None) -> MCoreSource:
    """Open and validate a checkpoint: ours (per-rank safetensors, every file against the plan) or a
    ``torch_dist`` directory (ours, or Megatron's with ``hf_config_path``). When the checkpoint has our
    manifest, ``hf_config_path`` must describe the same model (refused naming the differing fields, else
    accepted with a note); the manifest's config is the one used."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"{directory}: Megatron checkpoint directory not found")
    if is_torch_dist(directory):
        return _open_torch_dist(directory, hf_config_path)
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise InvalidInputError(
            f"{path}: manifest not found (not a checkpoint written by gemma4-harness convert)"
        )
    manifest = read_checkpoint_json(path, "manifest")
    if manifest.get("format") != FORMAT:
        raise InvalidInputError(f"{path}: field 'format' must be {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise InvalidInputError(
            f"{path}: field 'version' is {manifest.get('version')!r}; this reader knows {VERSION}"
        )
    tp = _field(manifest, path, "tensor_model_parallel_size", int)
    ep = _field(manifest, path, "expert_model_parallel_size", int)
    if manifest.get("pipeline_model_parallel_size", 1) != 1:
        raise InvalidInputError(f"{path}: field 'pipeline_model_parallel_size' must be 1")
    dtype_name = manifest.get("dtype")
    if dtype_name not in DTYPES:
        raise InvalidInputError(f"{path}: field 'dtype' is {dtype_name!r}; expected one of {sorted(DTYPES)}")
    dtype = DTYPES[dtype_name]
    hf_config = _manifest_hf_config(manifest, path)
    spec = text_spec_from_hf(hf_config)
    flag_notes = check_hf_config_flag(hf_config_path, spec, path)
    try:
        sharding.check_tp(spec, tp)
        sharding.check_ep(spec, ep)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from exc

    expected = plan(spec, dtype, tp, ep)
    stores: dict[Rank, SafetensorsDir] = {}
    for rank, entries in expected.items():
        rdir = directory / rank_dir_name(*rank, ep)
        store = SafetensorsDir(rdir, "rank")
        want = {e.name: e for e in entries}
        for e in entries:
            if e.name not in store.tensors:
                raise InvalidInputError(f"{rdir}: tensor {e.name!r} is missing")
        for name, info in store.tensors.items():
            e = want.get(name)
            if e is None:
                raise InvalidInputError(f"{info.path}: unexpected tensor {name!r}")
            if info.shape != e.shape:
                raise InvalidInputError(
                    f"{info.path}: tensor {name!r} has shape {list(info.shape)}; the manifest implies {list(e.shape)}"
                )
            if info.dtype != dtype:
                raise InvalidInputError(
                    f"{info.path}: tensor {name!r} has dtype {str(info.dtype).removeprefix('torch.')}; the "
                    f"manifest says {dtype_name}"
                )
        stores[rank] = store
    notes = [f"Megatron checkpoint {directory}: tp={tp} ep={ep} dtype={dtype_name}"] + flag_notes
    return MCoreSource(directory, manifest, hf_config, spec, dtype, tp, ep, stores, notes)


def load_mcore_checkpoint(
    model: torch.nn.Module, directory: Path, tp_rank: int = 0, ep_rank: int = 0
) -> MCoreSource:
    """Load rank ``(tp_rank, ep_rank)`` of a checkpoint into a Megatron model built for that rank."""
    src = open_mcore_checkpoint(directory)
    rank = (tp_rank, ep_rank)
    if rank not in src.stores:
        raise InvalidInputError(
            f"{directory}: has no rank tp={tp_rank} ep={ep_rank} (tp={src.tp}, ep={src.ep})"
        )
    state = {name: read_tensor(info) for name, info in src.stores[rank].tensors.items()}
    mapping.load_mcore_state_dict(model, state, source=f"{directory} ({rank_dir_name(*rank, src.ep)})")
    return src

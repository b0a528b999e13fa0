"""Whole-checkpoint conversion: HF directory <-> Megatron checkpoint, streamed one table rule at a time.

Every step validates its input completely before writing (names, shapes, dtypes, headers), writes into a
temporary directory next to the output and renames it into place at the end, so a refused or failed
conversion leaves nothing behind. Peak memory is about one rule's tensors (a layer's q/k/v, or the
embedding) plus their shards, never the whole model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gemma4 import atomic_io
from gemma4.conversion import mapping, sharding
from gemma4.conversion.hf_io import EXPORT_TARGETS, HFSource, open_hf_checkpoint, write_hf_config
from gemma4.conversion.manifest import FORMAT_TORCH_DIST, write_manifest
from gemma4.conversion.mcore_io import (
    gather_rule,
    hf_plan,
    manifest_dict,
    open_mcore_checkpoint,
    plan,
    rank_dir_name,
    split_rule,
)
from gemma4.conversion.safetensors_io import ShardedWriter, same_bytes
from gemma4.errors import InvalidInputError

HF_MAX_SHARD_BYTES = 5 * 1024**3
MCORE_MAX_SHARD_BYTES = 20 * 1024**3


def check_output_dir(out: Path) -> Path:
    """``out`` must not exist or be an empty directory."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InvalidInputError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()):
            raise InvalidInputError(f"--out {out}: output directory is not empty")
    return out


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` on success, delete it on failure
    or interruption (SIGINT and SIGTERM; :func:`gemma4.atomic_io.atomic_output_dir`)."""
    out = check_output_dir(out)
    with atomic_io.atomic_output_dir(out, "--out") as tmp:
        yield tmp


def software_versions() -> dict[str, str]:
    """The versions a conversion records in its manifest."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def hf_source_record(src: HFSource, hf_dir: Path) -> dict[str, Any]:
    """What a manifest records about the HF checkpoint a Megatron checkpoint was made from."""
    return {
        "hf_dir": str(Path(hf_dir).resolve()),
        "hf_prefix": src.prefix,
        "skipped_non_text_tensors": len(src.skipped),
        "notes": src.notes,
        "versions": software_versions(),
    }


FORMATS = ("safetensors", "torch_dist")


def hf_to_mcore_dir(
    hf_dir: Path, out: Path, tp: int = 1, ep: int = 1, fmt: str = "safetensors"
) -> dict[str, Any]:
    """Convert an HF checkpoint directory into a Megatron checkpoint at ``out``: per-rank safetensors
    (default, streamed) or ``torch_dist`` (Megatron's ``dist_checkpointing``, global tensors in memory)."""
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise InvalidInputError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    check_output_dir(out)
    src = open_hf_checkpoint(hf_dir)
    sharding.check_tp(src.spec, tp)
    sharding.check_ep(src.spec, ep)
    source = hf_source_record(src, hf_dir)
    if fmt == "torch_dist":
        from gemma4.conversion.torch_dist import save_torch_dist

        with atomic_output_dir(out) as tmp:
            save_torch_dist(src, tmp)
            manifest = manifest_dict(src.hf_config, src.dtype, tp, ep, source, FORMAT_TORCH_DIST)
            write_manifest(tmp, manifest)
        notes = src.notes + [
            "torch_dist holds global tensors; Megatron reshards them to any TP/EP at load (build the model "
            "with hetereogenous_dist_checkpoint=True)"
        ]
        return {
            "out": str(out),
            "format": fmt,
            "tp": tp,
            "ep": ep,
            "dtype": str(src.dtype).removeprefix("torch."),
            "hf_tensors": len(src.tensors),
            "notes": notes,
            "seconds": time.perf_counter() - t0,
        }
    layout = plan(src.spec, src.dtype, tp, ep)
    with atomic_output_dir(out) as tmp:
        writers = {
            rank: ShardedWriter(tmp / rank_dir_name(*rank, ep), entries, MCORE_MAX_SHARD_BYTES)
            for rank, entries in layout.items()
        }
        for rule, layer in mapping.bound_rules(src.spec):
            tensors = [src.read(n) for n in rule.hf]
            for rank, items in split_rule(rule, layer, tensors, src.spec, tp, ep).items():
                for name, t in items:
                    writers[rank].write(name, t)
            del tensors
        for w in writers.values():
            w.finish()
        write_manifest(tmp, manifest_dict(src.hf_config, src.dtype, tp, ep, source))
    return {
        "out": str(out),
        "format": fmt,
        "tp": tp,
        "ep": ep,
        "dtype": str(src.dtype).removeprefix("torch."),
        "hf_tensors": len(src.tensors),
        "notes": src.notes,
        "seconds": time.perf_counter() - t0,
    }


def mcore_to_hf_dir(
    mcore_dir: Path,
    out: Path,
    max_shard_bytes: int = HF_MAX_SHARD_BYTES,
    hf_config: Path | None = None,
    target: str = "hf",
) -> dict[str, Any]:
    """Export a Megatron checkpoint (ours, or a ``torch_dist`` one with ``hf_config``) as a
    ``Gemma4ForCausalLM`` directory (``target="hf"``) or, for SGLang, a text-only
    ``Gemma4ForConditionalGeneration`` one (``target="sglang"``: weights under ``model.language_model.``;
    see :func:`gemma4.conversion.hf_io.write_hf_config`)."""
    t0 = time.perf_counter()
    if target not in EXPORT_TARGETS:
        raise InvalidInputError(f"--for must be one of {list(EXPORT_TARGETS)}, got {target!r}")
    check_output_dir(out)
    try:
        src = open_mcore_checkpoint(mcore_dir, hf_config)
    except InvalidInputError as exc:
        from gemma4.conversion.megatron_bridge import sniff_bridge_hint

        hint = sniff_bridge_hint(Path(mcore_dir), hf_config)
        if not hint:
            raise
        raise InvalidInputError(f"{exc}; {hint}") from exc
    return export_hf_from_source(src, out, max_shard_bytes, target, t0)


def export_hf_from_source(
    src: Any,
    out: Path,
    max_shard_bytes: int = HF_MAX_SHARD_BYTES,
    target: str = "hf",
    t0: float | None = None,
) -> dict[str, Any]:
    """Write the HF export of an opened Megatron source (an :class:`~gemma4.conversion.mcore_io.MCoreSource`
    or anything with its ``spec``, ``dtype``, ``tp``, ``ep``, ``hf_config``, ``notes`` and ``read(rank, name)``)
    at ``out``, through a temporary directory. See :func:`mcore_to_hf_dir`."""
    t0 = time.perf_counter() if t0 is None else t0
    if target not in EXPORT_TARGETS:
        raise InvalidInputError(f"--for must be one of {list(EXPORT_TARGETS)}, got {target!r}")
    spec = src.spec
    prefix = mapping.HF_CAUSAL_LM_PREFIX if target == "hf" else mapping.HF_CONDITIONAL_GENERATION_PREFIX
    entries = hf_plan(spec, src.dtype, prefix)
    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_bytes)
        for rule, layer in mapping.bound_rules(spec):
            if src.tp > 1 and rule.kind == "copy" and rule.tp_layout in (mapping.VOCAB, mapping.COLUMN):
                # Row shards go straight to their place in the HF tensor: no concatenated copy (the
                # embedding is the largest tensor of the model). A copy rule maps rows to rows.
                offsets: dict[str, int] = {}
                for t in range(src.tp):
                    part = src.read((t, 0), rule.mcore)
                    for name, piece in mapping.rule_to_hf(rule, part, spec, layer):
                        full = name if name == "lm_head.weight" else prefix + name
                        writer.write_part(full, piece, offsets.get(full, 0))
                        offsets[full] = offsets.get(full, 0) + piece.numel() * piece.element_size()
                    del part
                continue
            if rule.is_expert:
                # Expert e is row e of HF's [E, ...] tensor: gather and write one expert at a time.
                num = spec.num_experts
                offsets = {}
                for e in range(num):
                    ep_rank, local = mapping.expert_placement(e, num, src.ep)
                    name = rule.mcore.format(e=local)
                    shards = [src.read((t, ep_rank), name) for t in range(src.tp)]
                    expert = sharding.gather_tp(rule, shards, name)
                    for hf_name, piece in mapping.rule_to_hf(rule, [expert], spec, layer):
                        full = prefix + hf_name
                        writer.write_part(full, piece, offsets.get(full, 0))
                        offsets[full] = offsets.get(full, 0) + piece.numel() * piece.element_size()
                    del shards, expert
                continue
            hf_tensors = gather_rule(rule, layer, src.read, spec, src.tp, src.ep)
            for name, t in hf_tensors:
                writer.write(name if name == "lm_head.weight" else prefix + name, t)
            del hf_tensors
        writer.finish()
        write_hf_config(tmp, src.hf_config, src.dtype, target)
    notes = list(src.notes)
    if target == "sglang":
        notes.append(
            "for SGLang: Gemma4ForConditionalGeneration with transformers' default vision_config and no "
            "vision weights (text-only; do not send images)"
        )
    return {
        "out": str(out),
        "for": target,
        "tp": src.tp,
        "ep": src.ep,
        "dtype": str(src.dtype).removeprefix("torch."),
        "hf_tensors": len(entries),
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }


def compare_hf(src: HFSource, other: HFSource) -> list[str]:
    """Differences between two validated HF checkpoints' text weights (relative names): keys, config, bytes."""
    diffs: list[str] = []
    if src.spec != other.spec:
        diffs.append("config.json differs (the text configs describe different models)")
    a, b = set(src.tensors), set(other.tensors)
    diffs += [f"tensor {n!r} is missing after the round trip" for n in sorted(a - b)]
    diffs += [f"tensor {n!r} appears only after the round trip" for n in sorted(b - a)]
    for name in sorted(a & b):
        x, y = src.tensors[name], other.tensors[name]
        if x.dtype != y.dtype:
            diffs.append(f"tensor {name!r}: dtype {x.dtype} became {y.dtype}")
        elif x.shape != y.shape:
            diffs.append(f"tensor {name!r}: shape {list(x.shape)} became {list(y.shape)}")
        elif not same_bytes(x, y):
            diffs.append(f"tensor {name!r}: values differ")
    return diffs


def roundtrip(
    hf_dir: Path, tp: int = 1, ep: int = 1, workdir: Path | None = None, fmt: str = "safetensors"
) -> dict[str, Any]:
    """HF -> Megatron (tp, ep) -> HF in a scratch directory; report whether the result is bit-exact."""
    t0 = time.perf_counter()
    src = open_hf_checkpoint(hf_dir)
    sharding.check_tp(src.spec, tp)
    sharding.check_ep(src.spec, ep)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with atomic_io.temp_dir("gemma4-roundtrip-", workdir) as scratch:
        mc, back = Path(scratch) / "mcore", Path(scratch) / "hf"
        to_mcore = hf_to_mcore_dir(hf_dir, mc, tp=tp, ep=ep, fmt=fmt)
        to_hf = mcore_to_hf_dir(mc, back)
        exported = open_hf_checkpoint(back)
        diffs = compare_hf(src, exported)
        kept = {exported.full_name(n) for n in exported.tensors}
        diffs += [f"the export also stores {n!r}" for n in sorted(set(exported.store.tensors) - kept)]
    notes = list(src.notes)
    if src.prefix != exported.prefix:
        notes.append(f"compared text weights by relative name ({src.prefix!r} -> {exported.prefix!r})")
    return {
        "identical": not diffs,
        "differences": diffs,
        "format": fmt,
        "tensors": len(src.tensors),
        "tp": tp,
        "ep": ep,
        "dtype": str(src.dtype).removeprefix("torch."),
        "notes": notes,
        "seconds": {
            "hf_to_mcore": to_mcore["seconds"],
            "mcore_to_hf": to_hf["seconds"],
            "total": time.perf_counter() - t0,
        },
    }

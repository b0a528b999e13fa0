"""The on-disk form of the goldens: ``manifest.json`` plus content-addressed case files.

Layout (``goldens/``)::

    manifest.json                                   schema_version, and one entry per case
    forward/tiny-31b/float64.<sha256[:12]>.safetensors
    weights/tiny-12b/float32.<sha256[:12]>.json
    chat/standard/single_turn.<sha256[:12]>.json

A case's file names carry a prefix of their sha256, so recording never overwrites a file the manifest points
to: new files are written next to the old ones, then the manifest is replaced (``os.replace``, the commit
point), then the old files are removed. An interrupted record therefore leaves the old goldens intact.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from gemma4.atomic_io import atomic_write_bytes
from gemma4.errors import InvalidInputError
from harness.provenance import producer_versions, sha256_bytes  # noqa: F401 - the one helper of each, re-exported

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIZE_BUDGET_BYTES = 20 * 1024 * 1024


class GoldenError(Exception):
    """A golden (or the manifest) is missing, corrupt, unreadable or of an unknown schema; names the file.
    The one error class of every golden family."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw little-endian bytes of ``t``."""
    t = t.detach().contiguous().cpu()
    head = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:".encode()
    return sha256_bytes(head + t.reshape(-1).view(torch.uint8).numpy().tobytes())


def case_file_name(case_name: str, suffix: str, data: bytes, digits: int = 12) -> str:
    """Content-addressed relative path, e.g. ``forward/tiny-31b/float64.3fa9c2d1e0b4.safetensors``."""
    return f"{case_name}.{sha256_bytes(data)[:digits]}{suffix}"


def safetensors_metadata(case_name: str, family: str) -> dict[str, str]:
    """Header metadata of a case file. One key only: safetensors writes metadata keys in random order, and
    golden bytes must be reproducible (a file's name is its hash)."""
    return {"golden": f"{case_name}; HF reference; harness.goldens.{family} schema {SCHEMA_VERSION}"}


def safe_relative(goldens_dir: Path, rel: Any) -> Path:
    """``goldens_dir / rel`` for a manifest-supplied relative POSIX path that stays inside ``goldens_dir``."""
    if not isinstance(rel, str) or not rel:
        raise GoldenError(f"{goldens_dir / MANIFEST}: file entry {rel!r} is not a relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise GoldenError(f"{goldens_dir / MANIFEST}: file entry {rel!r} leaves the goldens directory")
    return goldens_dir.joinpath(*pure.parts)


# ---- manifest -------------------------------------------------------------------------------------------


def empty_manifest() -> dict[str, Any]:
    """A manifest with no cases."""
    return {
        "schema_version": SCHEMA_VERSION,
        "description": (
            "Gemma 4 golden references: what HF transformers computed for each case, with provenance. "
            "Written only by `gemma4-harness goldens record`; checked by `gemma4-harness goldens check`."
        ),
        "size_budget_bytes": SIZE_BUDGET_BYTES,
        "cases": {},
    }


def read_manifest(goldens_dir: Path) -> dict[str, Any]:
    """The parsed, validated manifest; :class:`GoldenError` naming the file when it is not usable."""
    from gemma4.safe_read import read_json

    path = goldens_dir / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise GoldenError(
            f"{path}: missing (no goldens recorded here; record with `gemma4-harness goldens record`)"
        )
    try:
        manifest = read_json(path, "goldens manifest")
    except InvalidInputError as exc:  # not a regular file, too large, too deep, NaN, invalid JSON
        raise GoldenError(f"unreadable goldens manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise GoldenError(f"{path}: unreadable, expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise GoldenError(
            f"{path}: unknown schema_version {version!r}; this harness reads schema_version {SCHEMA_VERSION} "
            "(record the goldens again with this harness, or use the harness that wrote them)"
        )
    if not isinstance(manifest.get("cases"), dict):
        raise GoldenError(f"{path}: unreadable, field 'cases' must be an object")
    return manifest


def read_manifest_for_record(goldens_dir: Path) -> dict[str, Any]:
    """The existing manifest (or an empty one if there is none); a broken one is refused, never replaced."""
    if not (goldens_dir / MANIFEST).exists():
        return empty_manifest()
    try:
        return read_manifest(goldens_dir)
    except GoldenError as exc:
        raise InvalidInputError(f"{exc}; refusing to record over it (fix or remove it by hand)") from None


def write_manifest(goldens_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (the commit point of a record)."""
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(goldens_dir / MANIFEST, text.encode("utf-8"))


def read_case_files(goldens_dir: Path, case_name: str, entry: Any) -> dict[str, bytes]:
    """Every file of a case entry, verified against its recorded sha256 (keyed by relative path)."""
    manifest_path = goldens_dir / MANIFEST
    files = entry.get("files") if isinstance(entry, dict) else None
    if not isinstance(files, dict) or not files:
        raise GoldenError(f"{manifest_path}: case {case_name!r} has no 'files'")
    out: dict[str, bytes] = {}
    for rel, expected in files.items():
        path = safe_relative(goldens_dir, rel)
        if path.exists() and not path.is_file():
            raise GoldenError(f"{path}: golden file of case {case_name!r} is not a regular file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise GoldenError(f"{path}: missing golden file of case {case_name!r}") from None
        except OSError as exc:
            raise GoldenError(f"{path}: unreadable golden file of case {case_name!r} ({exc})") from None
        actual = sha256_bytes(data)
        if actual != expected:
            raise GoldenError(
                f"{path}: corrupt golden file of case {case_name!r} (sha256 {actual[:16]}... but the manifest "
                f"records {str(expected)[:16]}...)"
            )
        out[rel] = data
    return out


def file_with_suffix(
    files: dict[str, bytes], suffix: str, goldens_dir: Path, case_name: str
) -> tuple[str, bytes]:
    """The one file of a case ending in ``suffix``."""
    found = [(k, v) for k, v in files.items() if k.endswith(suffix)]
    if len(found) != 1:
        raise GoldenError(f"{goldens_dir / MANIFEST}: case {case_name!r} needs exactly one {suffix} file")
    return found[0]


def load_safetensors(data: bytes, path: Path, required: list[str]) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (no pickle); every name in ``required`` must be present."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise GoldenError(f"{path}: unreadable safetensors ({type(exc).__name__}: {exc})") from None
    missing = [n for n in required if n not in tensors]
    if missing:
        raise GoldenError(f"{path}: unreadable, tensor {missing[0]!r} is missing ({len(missing)} in total)")
    return tensors


def load_json_bytes(data: bytes, path: Path) -> Any:
    """Parse JSON bytes of a golden file."""
    from gemma4.safe_read import loads_json

    try:
        return loads_json(data, str(path))
    except InvalidInputError as exc:
        raise GoldenError(f"unreadable JSON: {exc}") from None


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    """Relative paths of every file the manifest's cases point to."""
    out: set[str] = set()
    for entry in manifest.get("cases", {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("files"), dict):
            out.update(entry["files"])
    return out


def stray_files(goldens_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Files under ``goldens_dir`` that no case points to."""
    known = referenced_files(manifest) | {MANIFEST}
    out = []
    for path in sorted(goldens_dir.rglob("*")):
        rel = path.relative_to(goldens_dir).as_posix()
        if not path.is_file() or rel in known:
            continue
        out.append(rel)
    return out


def total_size(goldens_dir: Path) -> int:
    """Bytes of every file under ``goldens_dir``."""
    return sum(p.stat().st_size for p in goldens_dir.rglob("*") if p.is_file())

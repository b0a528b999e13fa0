"""``goldens record``: compute the selected cases with HF and write them, atomically, with provenance.

Order of operations (so that nothing is lost on refusal or interruption):

1. read the manifest (a broken one is refused, never replaced) and select cases;
2. without ``--update``, refuse if any selected golden exists: nothing is computed or written;
3. compute every selected case; check the size budget;
4. write new content-addressed files next to the old ones;
5. replace the manifest (``os.replace``): the commit point;
6. remove the files the manifest no longer references (and, when every case of a family was recorded with
   ``--update``, any other file under that family's directory: leftovers of an older layout).

This is the only writer of goldens: ``gemma4-harness goldens record`` and pytest's ``--goldens-update``
(:func:`record_goldens` with one case) both come here.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gemma4.errors import InvalidInputError
from harness.goldens.progress import progress
from harness.goldens.registry import all_cases, family, select
from harness.goldens.store import (
    SIZE_BUDGET_BYTES,
    GoldenError,
    atomic_write_bytes,
    case_file_name,
    producer_versions,
    read_case_files,
    read_manifest_for_record,
    referenced_files,
    safe_relative,
    sha256_bytes,
    stray_files,
    total_size,
    write_manifest,
)


def _refuse_existing(goldens_dir: Path, manifest: dict, cases: list[Any]) -> None:
    existing = [c.name for c in cases if c.name in manifest["cases"]]
    if existing:
        raise InvalidInputError(
            f"{goldens_dir}: golden {existing[0]!r} already exists ({len(existing)} of the selected goldens "
            "exist); goldens are evidence and are only overwritten with `gemma4-harness goldens record --update`"
        )


def _old_files(goldens_dir: Path, name: str, entry: Any) -> tuple[dict[str, bytes] | None, str | None]:
    """The verified files of the existing golden (None if there is none), or why they cannot be read."""
    if not entry:
        return None, None
    try:
        return read_case_files(goldens_dir, name, entry), None
    except GoldenError as exc:
        return None, str(exc)


def _remove_with_empty_parents(goldens_dir: Path, rel: str) -> None:
    path = safe_relative(goldens_dir, rel)
    path.unlink(missing_ok=True)
    parent = path.parent
    while parent != goldens_dir and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _free_name(goldens_dir: Path, case_name: str, suffix: str, data: bytes) -> str:
    """The content-addressed name, lengthened if a hand-edited file already holds it with other bytes (a file
    the current manifest may reference must never be overwritten before the manifest is replaced)."""
    rel = case_file_name(case_name, suffix, data)
    path = goldens_dir / rel
    if path.exists() and path.read_bytes() != data:
        rel = case_file_name(case_name, suffix, data, digits=64)
    return rel


def record_goldens(
    goldens_dir: Path,
    only: list[str] | None = None,
    update: bool = False,
    command: str = "gemma4-harness goldens record",
    show_progress: bool | None = None,
) -> list[str]:
    """Record the selected goldens into ``goldens_dir``; returns one line per case saying what changed."""
    goldens_dir = Path(goldens_dir)
    cases = select(only)
    manifest = read_manifest_for_record(goldens_dir)
    if not update:
        _refuse_existing(goldens_dir, manifest, cases)

    recordings = {
        c.name: family(c.family).record(c) for c in progress(cases, "recording goldens", show_progress)
    }

    producer = producer_versions()
    recorded_at = datetime.now(UTC).isoformat(timespec="seconds")
    new_manifest = copy.deepcopy(manifest)
    lines: list[str] = []
    if new_manifest.pop("delegated", None) is not None:  # older manifests pointed to a separate chat manifest
        lines.append("removed the manifest's 'delegated' field: every family lives in this manifest")
    to_write: dict[str, bytes] = {}
    for case in cases:
        rec = recordings[case.name]
        old_entry = manifest["cases"].get(case.name)
        files = {_free_name(goldens_dir, case.name, suffix, data): data for suffix, data in rec.files.items()}
        file_shas = {rel: sha256_bytes(data) for rel, data in files.items()}
        old_files, broken = _old_files(goldens_dir, case.name, old_entry)
        line = family(case.family).describe_change(case, old_files, rec)
        if broken:
            line = f"replaced {case.name}: the old golden was broken ({broken})"
        if old_files and sorted(map(sha256_bytes, old_files.values())) == sorted(file_shas.values()):
            lines.append(line)
            continue  # the same evidence, verified on disk: keep its files and original provenance
        if line.startswith("unchanged "):  # equal values in different bytes (file format, metadata)
            line = line.replace("unchanged ", "rewrote ", 1) + ": values unchanged, file bytes differ"
        lines.append(line)
        new_manifest["cases"][case.name] = {
            **case.identity(),
            **rec.fields,
            "files": file_shas,
            "producer": producer,
            "command": command,
            "recorded_at": recorded_at,
        }
        to_write.update(files)

    if update and not only:
        known = {c.name for c in all_cases()}
        for name in sorted(set(new_manifest["cases"]) - known):
            del new_manifest["cases"][name]
            lines.append(f"removed {name} (no longer a golden case)")

    keep = referenced_files(new_manifest)
    chosen = {c.name for c in cases}
    whole = {
        f for f in {c.family for c in cases} if update and all(c.name in chosen for c in family(f).cases())
    }
    strays = stray_files(goldens_dir, manifest) if goldens_dir.exists() else []
    leftovers = [rel for rel in strays if rel.split("/")[0] in whole and not rel.endswith(".tmp")]
    obsolete = (
        (referenced_files(manifest) - keep)
        | {rel for rel in strays if any(rel.startswith(c.name + ".") for c in cases)}
        | set(leftovers)
    )
    lines += [f"removed {rel} (no case references it)" for rel in sorted(set(leftovers) - keep)]
    current = total_size(goldens_dir) if goldens_dir.exists() else 0
    projected = (
        current
        - sum((goldens_dir / r).stat().st_size for r in obsolete if (goldens_dir / r).is_file())
        + sum(len(d) for r, d in to_write.items() if not (goldens_dir / r).exists())
    )
    if projected > SIZE_BUDGET_BYTES:
        raise InvalidInputError(
            f"{goldens_dir}: recording would make the goldens {projected / 1e6:.1f} MB, over the "
            f"{SIZE_BUDGET_BYTES / 2**20:.0f} MiB budget; store fewer points or a smaller case"
        )

    for rel, data in to_write.items():
        path = safe_relative(goldens_dir, rel)
        if not (path.exists() and path.read_bytes() == data):
            atomic_write_bytes(path, data)
    if to_write or new_manifest != manifest or not (goldens_dir / "manifest.json").exists():
        write_manifest(goldens_dir, new_manifest)
    for rel in sorted(obsolete - keep):
        _remove_with_empty_parents(goldens_dir, rel)

    lines.append(
        f"goldens: {total_size(goldens_dir) / 1e6:.2f} MB of the {SIZE_BUDGET_BYTES / 2**20:.0f} MiB budget"
    )
    return lines

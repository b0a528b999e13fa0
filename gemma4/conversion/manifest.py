"""The manifest of a Megatron checkpoint this project writes (``gemma4_mcore.json``): its file name, format
tags and version, and how it is written. Both layouts use it: our per-rank safetensors
(:mod:`gemma4.conversion.mcore_io`) and Megatron's ``torch_dist`` (:mod:`gemma4.conversion.torch_dist`),
which is why it lives in neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "gemma4_mcore.json"
FORMAT = "gemma4-mcore-safetensors"
FORMAT_TORCH_DIST = "gemma4-mcore-torch_dist"
VERSION = 1


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as ``directory/gemma4_mcore.json`` (indented JSON, one trailing newline)."""
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

"""Provenance: the versions of the software that shaped a result, the platform, and sha256 digests.

The one place for both: JSON reports, parity results and every golden (:mod:`harness.goldens`) take their
versions and checksums from here.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata


def software_versions() -> dict[str, str]:
    """python, torch, transformers and megatron-core versions."""
    import megatron.core
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron-core": getattr(megatron.core, "__version__", "unknown"),
    }


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def producer_versions() -> dict[str, str]:
    """Everything that shapes a golden: :func:`software_versions`, the tokenizer stack (``tokenizers``,
    ``jinja2``: chat renders and masks), the platform and the machine."""
    return {
        **software_versions(),
        "tokenizers": _distribution_version("tokenizers"),
        "jinja2": _distribution_version("jinja2"),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` encoded as UTF-8."""
    return sha256_bytes(text.encode("utf-8"))

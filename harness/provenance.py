"""Versions of the software that shapes a result (for JSON reports, goldens and parity results)."""

from __future__ import annotations

import platform


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

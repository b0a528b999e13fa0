"""The parallel layouts a report compares, as a registry.

Each entry is ``{"name", "kwargs", "description"[, "applies"]}`` (``applies(preset) -> bool`` limits a
layout to some presets); ``kwargs`` go to :func:`harness.parity.run_parity` as
they are. The first entry is the baseline the others are compared with (same inputs, logits) in the
layout-equivalence table and plot. Add a row by appending, e.g. with :class:`harness.parity.RunLayout`::

    {"name": "tp2", "kwargs": {"layout": RunLayout(tp=2)}, "description": "tensor parallel 2"},
    {"name": "cp2", "kwargs": {"layout": RunLayout(cp=2)}, "description": "context parallel 2 (zig-zag)"},
    {"name": "packed", "kwargs": {"layout": RunLayout(packed=(8, 12, 4))}, "description": "packed documents"},

A row that raises is reported as failed (with the exception), not fatal to the report.
"""

from __future__ import annotations

from typing import Any

from gemma4.errors import InvalidInputError
from harness.parity.layout import RunLayout


def _moe(preset: str) -> bool:
    from harness.presets import PRESETS

    return bool(PRESETS.get(preset, {}).get("enable_moe_block"))


LAYOUTS: list[dict[str, Any]] = [
    {"name": "tp1", "kwargs": {}, "description": "single process: TP=1, CP=1, EP=1"},
    {
        "name": "tp2",
        "kwargs": {"layout": RunLayout(tp=2)},
        "description": "tensor parallel 2",
        "applies": lambda p: not _moe(p),
    },
    {
        "name": "tp2+sp",
        "kwargs": {"layout": RunLayout(tp=2, sequence_parallel=True)},
        "description": "tensor parallel 2 with sequence parallelism",
    },
    {"name": "cp2", "kwargs": {"layout": RunLayout(cp=2)}, "description": "context parallel 2 (zig-zag)"},
    {
        "name": "packed",
        "kwargs": {"layout": RunLayout(packed=(8, 12, 4))},
        "description": "one packed row of documents 8, 12, 4 (reference: each alone)",
    },
    {
        "name": "cp2+packed",
        "kwargs": {"layout": RunLayout(cp=2, packed=(8, 12, 4))},
        "description": "context parallel 2 over packed documents",
    },
    {
        "name": "ep2",
        "kwargs": {"layout": RunLayout(ep=2)},
        "description": "expert parallel 2 (MoE presets)",
        "applies": _moe,
    },
]


def baseline() -> dict[str, Any]:
    """The layout every other layout is compared with."""
    return LAYOUTS[0]


def select_layouts(names: list[str] | None) -> list[dict[str, Any]]:
    """Layouts by name (all when ``names`` is empty; the baseline always); an unknown name is invalid input."""
    if not names:
        return list(LAYOUTS)
    by_name = {layout["name"]: layout for layout in LAYOUTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InvalidInputError(f"--layout {unknown[0]!r} is not registered; layouts: {', '.join(by_name)}")
    chosen = [by_name[n] for n in dict.fromkeys(names)]
    if baseline() not in chosen:  # equivalence rows need the baseline
        chosen.insert(0, baseline())
    return chosen

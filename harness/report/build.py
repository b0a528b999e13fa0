"""Write a report directory: ``report.html`` (self-contained), ``summary.md``, ``plots/*.png``,
``results.json`` and, on request, JUnit XML. Every file is written to a temp name and renamed."""

from __future__ import annotations

import json
from pathlib import Path

from gemma4.atomic_io import json_safe
from gemma4.errors import InvalidInputError
from harness.goldens.store import atomic_write_bytes
from harness.report.collect import ReportData


def render_plots(data: ReportData) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInputError(
            "the report's plots need matplotlib: pip install -e '.[test]' (or pip install matplotlib)"
        ) from None
    from harness.report import plots

    return {
        "per_layer": plots.per_layer(data.rows),
        "per_position": plots.per_position(data.rows),
        "equivalence": plots.equivalence(data.equivalence, data.layouts),
        "golden_drift": plots.golden_drift(data.goldens.outcomes if data.goldens else []),
    }


def write_report(data: ReportData, out_dir: Path, junit: Path | None = None) -> dict[str, Path]:
    """Render and write everything; returns the written paths by kind."""
    from harness.report import render

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"--out {out_dir}: exists and is not a directory")
    pngs = render_plots(data)
    written: dict[str, Path] = {}
    for name, png in pngs.items():
        written[f"plot:{name}"] = out_dir / "plots" / f"{name}.png"
        atomic_write_bytes(written[f"plot:{name}"], png)
    written["markdown"] = out_dir / "summary.md"
    atomic_write_bytes(written["markdown"], render.markdown(data).encode("utf-8"))
    written["html"] = out_dir / "report.html"
    atomic_write_bytes(written["html"], render.html_page(data, pngs).encode("utf-8"))
    results = {
        "pass": data.passed,
        "failures": data.failures,
        "created_at": data.created_at,
        "versions": data.versions,
        "settings": data.settings,
        # the registry rows without their ``applies`` callables (a function repr is not data)
        "layouts": [{k: v for k, v in lay.items() if not callable(v)} for lay in data.layouts],
        "rows": [r.to_json() for r in data.rows],
        "equivalence": [e.to_json() for e in data.equivalence],
        "goldens": data.goldens.to_json() if data.goldens else None,
    }
    written["json"] = out_dir / "results.json"
    atomic_write_bytes(
        written["json"],
        (json.dumps(json_safe(results), indent=1, default=str, allow_nan=False) + "\n").encode(),
    )
    if junit is not None:
        written["junit"] = Path(junit)
        atomic_write_bytes(written["junit"], render.junit_xml(data))
    return written

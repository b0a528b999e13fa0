"""Render a :class:`~harness.report.collect.ReportData` as Markdown, one self-contained HTML page, JUnit XML."""

from __future__ import annotations

import base64
import html
import xml.etree.ElementTree as ET
from typing import Any

from harness.goldens.outcome import LABELS
from harness.report.collect import shorten

PLOTS = (
    ("per_layer", "Error per layer (ours vs HF)"),
    ("per_position", "Error per token position (ours vs HF)"),
    ("equivalence", "CP/TP/EP equivalence"),
    ("golden_drift", "Distance from the goldens"),
)


def _e(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def parity_table(data) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the parity table (shared by Markdown and HTML)."""
    header = [
        "preset",
        "dtype",
        "layout",
        "tolerance",
        "logits max abs",
        "logits max rel",
        "mean KL",
        "activations max scaled",
        "first divergence",
        "pass",
    ]
    rows = []
    for r in data.rows:
        if r.status == "n/a":
            why = shorten(f"not applicable: {r.not_applicable}")
            rows.append([r.preset, r.dtype, r.layout, "", "", "", "", "", why, "n/a"])
            continue
        if r.result is None:
            rows.append(
                [r.preset, r.dtype, r.layout, "", "", "", "", "", shorten(f"error: {r.error}"), "FAIL"]
            )
            continue
        m, tol = r.result["metrics"], r.result["tolerance"]
        rows.append(
            [
                r.preset,
                r.dtype,
                r.layout,
                tol["name"],
                f"{_e(m['logits']['max_abs'])} (≤ {tol['logits_max_abs']:.0e})",
                _e(m["logits"]["max_rel"]),
                f"{_e(m['kl_mean'])}" + (f" (≤ {tol['kl_max']:.0e})" if tol["kl_max"] is not None else ""),
                f"{_e(m['activations_max_scaled'])} (≤ {tol['activations_max_scaled']:.0e})",
                r.result["first_divergence"] or "",
                "PASS" if r.passed else "FAIL",
            ]
        )
    return header, rows


def equivalence_table(data) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the layout-equivalence table."""
    header = ["preset", "dtype", "layout", "baseline", "logits max abs vs baseline", "bound", "pass"]
    rows = [
        [
            e.preset,
            e.dtype,
            e.layout,
            e.baseline,
            shorten(e.error or e.not_comparable or _e(e.max_abs)),
            f"{e.bound:.0e}",
            "n/a" if e.passed and e.not_comparable else "PASS" if e.passed else "FAIL",
        ]
        for e in data.equivalence
    ]
    return header, rows


def goldens_table(data) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the goldens table."""
    header = ["case", "status", "ours vs golden", "HF now vs golden", "detail"]
    rows = []
    for o in data.goldens.outcomes if data.goldens else []:
        ours, hf = o.metrics.get("ours_vs_golden"), o.metrics.get("hf_vs_golden")
        if isinstance(ours, dict):  # forward: the worse of logits and activations, each against its own bound
            ours_s = f"logits {_e(ours['logits_max_abs'])}, act {_e(ours['activations_max_scaled'])}"
            hf_s = f"logits {_e(hf['logits_max_abs'])}, act {_e(hf['activations_max_scaled'])}"
        elif isinstance(ours, float):
            ours_s, hf_s = _e(ours), _e(hf)
        elif "mcore_changed" in o.metrics:
            ours_s = f"{o.metrics['mcore_changed']} checksums differ"
            hf_s = f"{o.metrics['hf_changed']} checksums differ"
        else:
            ours_s = hf_s = ""
        detail = o.message if not o.ok or not ours_s else ""  # a passing row's numbers are in the columns
        rows.append([o.case, LABELS[o.status], ours_s, hf_s, shorten(detail)])
    return header, rows


def _no_layouts_text(data) -> str:
    return f"No parallel layouts available yet (only {', '.join(lay['name'] for lay in data.layouts)})."


def _headline(data) -> str:
    n_gold = len(data.goldens.outcomes) if data.goldens else 0
    verdict = "PASS" if data.passed else "FAIL"
    n_na = len(data.not_applicable)
    return (
        f"Result: **{verdict}**: {len(data.rows)} parity runs ({len(data.rows) - n_na} applicable, {n_na} not "
        f"applicable to {data.impl}), {len(data.equivalence)} layout comparisons, {n_gold} golden cases checked."
    )


def _impl_line(data) -> str:
    ours = " (this repo's model)" if data.impl == "gemma4-mcore" else " (not this repo's model)"
    return (
        f"Implementation under test: {data.impl}{ours}, against HF transformers. Rows it declares it cannot "
        "run are shown as n/a with its reason and are not counted as failures."
    )


def _parity_title(data) -> str:
    return f"Parity: {data.impl} vs HF (preset × dtype × layout)"


def _versions_line(data) -> str:
    v = data.versions
    return (
        f"Created {data.created_at}; python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"megatron-core {v['megatron-core']}; {v['platform']}. Settings: batch {data.settings['batch']}, "
        f"seq_len {data.settings['seq_len']}, seed {data.settings['seed']}."
    )


def markdown(data, plot_dir: str = "plots") -> str:
    """The Markdown summary (links the PNGs written under ``plot_dir``)."""

    def table(header, rows) -> list[str]:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        return out

    lines = [
        "# Gemma 4 parity report",
        "",
        _headline(data),
        "",
        _impl_line(data),
        "",
        _versions_line(data),
        "",
    ]
    lines += [f"## {_parity_title(data)}", "", *table(*parity_table(data)), ""]
    lines += [f"## Layout equivalence (against {data.layouts[0]['name']})", ""]
    lines += [*table(*equivalence_table(data)), ""] if data.equivalence else [_no_layouts_text(data), ""]
    if data.goldens is not None:
        g = data.goldens
        lines += [f"## Goldens (`{g.goldens_dir}`, exit {g.exit_code})", "", *table(*goldens_table(data)), ""]
        lines += [f"- {n}" for n in g.notes] + [""]
    else:
        lines += ["## Goldens", "", "Not checked (--no-goldens).", ""]
    if not data.passed:
        lines += ["## Failures", ""] + [f"- {_md_cell(f)}" for f in data.failures] + [""]
    lines += ["## Plots", ""] + [f"![{title}]({plot_dir}/{name}.png)" for name, title in PLOTS] + [""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.PASS,td.ok{background:#dff0d8} td.FAIL,td.REGRESSION{background:#f2dede}
td.HF{background:#fcf8e3} td.BROKEN{background:#f2dede} .verdict{font-size:1.3em}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0} details{margin:0.5em 0 1.5em}
"""


def _html_table(header, rows, status_col: int | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = f' class="{html.escape(str(c).split()[0])}"' if i == status_col and str(c) else ""
            cells.append(f"<td{cls}>{html.escape(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def html_page(data, pngs: dict[str, bytes]) -> str:
    """One self-contained HTML page (CSS inline, plots as data URIs)."""
    headline = _headline(data).replace("**", "")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Gemma 4 parity report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Gemma 4 parity report</h1>",
        f"<p class='verdict'>{html.escape(headline)}</p>",
        f"<p>{html.escape(_impl_line(data))}</p>",
        f"<p>{html.escape(_versions_line(data))}</p>",
        f"<h2>{html.escape(_parity_title(data))}</h2>",
        _html_table(*parity_table(data), status_col=9),
        f"<h2>Layout equivalence (against {html.escape(data.layouts[0]['name'])})</h2>",
        _html_table(*equivalence_table(data), status_col=6)
        if data.equivalence
        else f"<p>{html.escape(_no_layouts_text(data))}</p>",
    ]
    if data.goldens is not None:
        g = data.goldens
        parts += [
            f"<h2>Goldens ({html.escape(str(g.goldens_dir))}, exit {g.exit_code})</h2>",
            _html_table(*goldens_table(data), status_col=1),
            "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in g.notes) + "</ul>",
        ]
    if not data.passed:
        parts += [
            "<h2>Failures</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in data.failures) + "</ul>"
        ]
    parts.append("<h2>Plots</h2>")
    for name, title in PLOTS:
        b64 = base64.b64encode(pngs[name]).decode("ascii")
        parts.append(
            f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
        )
    tol_rows = [
        [t["name"], t["logits_max_abs"], t["activations_max_scaled"], t["kl_max"], t["why"]]
        for t in data.tolerances
    ]
    parts += [
        "<h2>Tolerance policy (harness/tolerances.py)</h2>",
        _html_table(["name", "logits max abs", "activations max scaled", "mean KL", "why"], tol_rows),
        "<h2>Layouts (harness/report/layouts.py)</h2>",
        _html_table(
            ["name", "run_parity kwargs", "description"],
            [[lay["name"], lay["kwargs"], lay.get("description", "")] for lay in data.layouts],
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def junit_xml(data) -> bytes:
    """JUnit XML: a test case per parity row, layout comparison and golden case; a not-applicable parity
    row is a skipped test case with the implementation's reason (never a failure)."""
    root = ET.Element("testsuites", name="gemma4-harness report")

    def suite(name: str, cases: list[tuple[str, str, str | None, str | None]]) -> None:
        """``cases``: (classname, name, failure or None, skipped reason or None)."""
        failures = sum(1 for *_, f, skip in cases if f is not None and skip is None)
        skipped = sum(1 for *_, skip in cases if skip is not None)
        s = ET.SubElement(
            root,
            "testsuite",
            name=name,
            tests=str(len(cases)),
            failures=str(failures),
            errors="0",
            skipped=str(skipped),
        )
        for classname, case_name, failure, skip in cases:
            tc = ET.SubElement(s, "testcase", classname=classname, name=case_name)
            if skip is not None:
                ET.SubElement(tc, "skipped", message=skip[:500]).text = skip
            elif failure is not None:
                ET.SubElement(tc, "failure", message=failure[:500]).text = failure

    suite(
        "parity",
        [
            (
                f"parity.{r.preset}",
                f"{r.dtype}-{r.layout}",
                None if r.passed else (r.error if r.result is None else "; ".join(r.result["failures"])),
                f"not applicable to {data.impl}: {r.not_applicable}" if r.status == "n/a" else None,
            )
            for r in data.rows
        ],
    )
    suite(
        "equivalence",
        [
            (
                f"equivalence.{e.preset}",
                f"{e.dtype}-{e.layout}",
                None if e.passed else (e.error or f"{e.max_abs}"),
                None,
            )
            for e in data.equivalence
        ],
    )
    if data.goldens is not None:
        suite(
            "goldens",
            [
                ("goldens", o.case, None if o.ok else f"{o.status}: {o.message}", None)
                for o in data.goldens.outcomes
            ],
        )
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)

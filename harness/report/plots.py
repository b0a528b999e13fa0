"""The report's figures, as PNG bytes (matplotlib's object API with the Agg canvas: no pyplot, no display).

Errors span 0 (bitwise equal, the usual fp32/bf16 CPU result) to O(1), so every error axis is logarithmic
and an exact 0 is drawn at :data:`FLOOR` (said on the axis).
"""

from __future__ import annotations

import io
from typing import Any

FLOOR = 1e-18
_STYLE = {"float64": "-o", "float32": "-s", "bfloat16": "-^"}


def _figure(ncols: int, nrows: int, width: float = 4.6, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8.0, width * ncols), height * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _log_axis(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _floored(values: list[float]) -> list[float]:
    return [max(v, FLOOR) if v == v else FLOOR for v in values]  # NaN drawn at the floor too


def message_figure(text: str) -> bytes:
    """A small figure that only says ``text`` (e.g. nothing to plot yet)."""
    fig, axes = _figure(1, 1, 6.0, 1.6)
    ax = axes[0][0]
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    return _png(fig)


def _point_ticks(points: list[str], layer_types: list[str]) -> tuple[list[int], list[str]]:
    ticks, labels = [], []
    for i, name in enumerate(points):
        if name == "embedding":
            ticks.append(i), labels.append("emb")
        elif name.endswith(".attention"):
            idx = int(name.split(".")[1])
            kind = "F" if layer_types[idx] == "full_attention" else "S"
            ticks.append(i), labels.append(f"L{idx}{kind}")
        elif name in ("final_norm", "logits"):
            ticks.append(i), labels.append("norm" if name == "final_norm" else "logits")
    return ticks, labels


def per_layer(rows: list[Any]) -> bytes:
    """Ours vs HF at every capture point, per preset (rows) and dtype (columns), one line per layout."""
    ok_rows = [r for r in rows if r.result is not None]
    if not ok_rows:
        return message_figure("no parity run finished: nothing to plot")
    presets = list(dict.fromkeys(r.preset for r in ok_rows))
    dtypes = list(dict.fromkeys(r.dtype for r in ok_rows))
    fig, axes = _figure(len(dtypes), len(presets))
    for i, preset in enumerate(presets):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            cell = [r for r in ok_rows if r.preset == preset and r.dtype == dtype]
            for r in cell:
                pp = r.result["per_point"]
                points = list(pp)
                values = [pp[p]["max_abs"] if p == "logits" else pp[p]["scaled"] for p in points]
                ax.plot(range(len(points)), _floored(values), _STYLE.get(dtype, "-o"), ms=3, label=r.layout)
                ticks, labels = _point_ticks(points, r.result["config"]["layer_types"])
                ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
            if cell:
                tol = cell[0].result["tolerance"]
                ax.axhline(
                    tol["activations_max_scaled"], color="red", ls="--", lw=1, label="activation bound"
                )
                ax.axhline(tol["logits_max_abs"], color="orange", ls=":", lw=1, label="logits bound")
            _log_axis(ax)
            ax.set_title(f"{preset} {dtype}", fontsize=9)
            ax.set_ylabel(f"error (0 drawn at {FLOOR:.0e})", fontsize=7)
            ax.legend(fontsize=6)
    fig.suptitle(
        "Ours vs HF per capture point\nactivations: max|d| / max(1, max|ref|); logits: max|d|", fontsize=10
    )
    return _png(fig)


def per_position(rows: list[Any]) -> bytes:
    """Logits max|ours - HF| per token position, one panel per preset; dashed line at the sliding window."""
    ok_rows = [r for r in rows if r.per_position]
    if not ok_rows:
        return message_figure("no parity run finished: nothing to plot")
    presets = list(dict.fromkeys(r.preset for r in ok_rows))
    fig, axes = _figure(len(presets), 1)
    for j, preset in enumerate(presets):
        ax = axes[0][j]
        cell = [r for r in ok_rows if r.preset == preset]
        for r in cell:
            label = r.dtype if len({x.layout for x in cell}) == 1 else f"{r.dtype} {r.layout}"
            ax.plot(
                range(len(r.per_position)),
                _floored(r.per_position),
                _STYLE.get(r.dtype, "-o"),
                ms=3,
                label=label,
            )
        window = cell[0].sliding_window
        if window is not None:
            ax.axvline(window - 0.5, color="grey", ls="--", lw=1, label=f"sliding window {window}")
        _log_axis(ax)
        ax.set_xlabel("token position")
        ax.set_ylabel(f"logits max|d| (0 drawn at {FLOOR:.0e})", fontsize=7)
        ax.set_title(preset, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(
        "Ours vs HF per token position\nright of the dashed line, sliding layers see a truncated context",
        fontsize=10,
    )
    return _png(fig)


def equivalence(eq_rows: list[Any], layouts: list[dict[str, Any]]) -> bytes:
    """Each parallel layout's logits against the baseline layout's, per preset and dtype."""
    if not eq_rows:
        names = ", ".join(layout["name"] for layout in layouts)
        return message_figure(f"no parallel layouts available yet (only {names}): nothing to compare")
    eq_rows = [e for e in eq_rows if e.not_comparable is None]  # other inputs: a bar would read as "equal"
    if not eq_rows:
        return message_figure("no layout runs the baseline's inputs: compared with HF only")
    fig, axes = _figure(1, 1, max(6.0, 0.6 * len(eq_rows)), 3.2)
    ax = axes[0][0]
    labels = [f"{e.preset}\n{e.dtype}\n{e.layout}" for e in eq_rows]
    values = _floored([e.max_abs if e.max_abs is not None else float("nan") for e in eq_rows])
    colors = ["tab:green" if e.passed else "tab:red" for e in eq_rows]
    ax.bar(range(len(eq_rows)), values, color=colors)
    ax.scatter(
        range(len(eq_rows)), [e.bound for e in eq_rows], marker="_", s=300, color="black", label="bound"
    )
    ax.set_xticks(range(len(eq_rows)), labels, fontsize=7)
    _log_axis(ax)
    ax.set_ylabel(f"logits max|d| vs {eq_rows[0].baseline} (0 at {FLOOR:.0e})", fontsize=7)
    ax.legend(fontsize=7)
    fig.suptitle(
        "CP/TP/EP equivalence: each layout against the single-process baseline\n(red: over the bound or errored)",
        fontsize=10,
    )
    return _png(fig)


def golden_drift(outcomes: list[Any]) -> bytes:
    """For each checked ``forward`` golden: ours vs golden and HF-now vs golden at every capture point."""
    cases = [o for o in outcomes if o.case.startswith("forward/") and "ours_vs_golden" in o.metrics]
    if not cases:
        return message_figure("no forward goldens were checked")
    ncols = min(2, len(cases))
    nrows = (len(cases) + ncols - 1) // ncols
    fig, axes = _figure(ncols, nrows)
    for k, o in enumerate(cases):
        ax = axes[k // ncols][k % ncols]
        for key, label, style in (
            ("ours_vs_golden", "ours vs golden", "-o"),
            ("hf_vs_golden", "HF now vs golden", "-x"),
        ):
            pp = o.metrics[key]["per_point"]
            ax.plot(range(len(pp)), _floored(list(pp.values())), style, ms=3, label=label)
        tol = o.metrics["tolerance"]
        ax.axhline(tol["activations_max_scaled"], color="red", ls="--", lw=1, label="bound")
        _log_axis(ax)
        ax.set_title(f"{o.case} ({o.status})", fontsize=9)
        ax.set_xlabel("capture point (forward order)", fontsize=7)
        ax.legend(fontsize=6)
    for k in range(len(cases), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.suptitle(f"Distance from the goldens (0 drawn at {FLOOR:.0e})", fontsize=10)
    return _png(fig)

"""Layout equivalence on synthetic rows: the bound, a failing layout, and rows with other inputs (packed).

Catches: a layout compared against the wrong baseline (another preset or dtype), a layout whose logits are
off passing, packed rows gated (or drawn) as if they ran the baseline's inputs.
"""

from __future__ import annotations

import torch

from harness.report import plots
from harness.report.collect import ParityRow, equivalence_rows

IDS = torch.arange(12).reshape(2, 6)


def row(
    layout: str, logits: torch.Tensor, ids: torch.Tensor = IDS, dtype: str = "float32", preset: str = "p"
):
    tol = {"logits_max_abs": 5e-5}
    return ParityRow(preset, dtype, layout, result={"tolerance": tol}, logits=logits, input_ids=ids)


def test_equivalence_gates_on_the_bound_and_skips_other_inputs():
    base = torch.randn(2, 6, 10, dtype=torch.float64)
    shifted = base.clone()
    shifted[1, 4, 2] += 1e-3
    rows = [
        row("tp1", base),
        row("tp1", base + 1.0, preset="other"),  # another preset's baseline must not be used
        row("tp2", base + 1e-6),
        row("cp2", shifted),
        row("packed", base, ids=IDS + 1),
    ]
    eq = {e.layout: e for e in equivalence_rows(rows, "tp1")}
    assert set(eq) == {"tp2", "cp2", "packed"}
    assert eq["tp2"].passed and abs(eq["tp2"].max_abs - 1e-6) < 1e-12 and eq["tp2"].bound == 5e-5
    assert not eq["cp2"].passed and eq["cp2"].per_position.index(max(eq["cp2"].per_position)) == 4
    assert (
        eq["packed"].passed
        and eq["packed"].max_abs is None
        and "inputs differ" in eq["packed"].not_comparable
    )
    png = plots.equivalence(list(eq.values()), [{"name": "tp1"}])
    assert png[:4] == b"\x89PNG"


def test_missing_baseline_fails_the_layout():
    eq = equivalence_rows([row("tp2", torch.zeros(2, 6, 10))], "tp1")
    assert len(eq) == 1 and not eq[0].passed and eq[0].error == "baseline not run"

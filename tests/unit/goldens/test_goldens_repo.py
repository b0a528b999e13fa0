"""The committed goldens: every case recorded, with provenance, within budget, and ``goldens check`` passes.

This is how ``tox -e unit`` runs ``gemma4-harness goldens check`` (in-process, on the repository's goldens/).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.goldens.check import check_goldens, format_check
from harness.goldens.registry import all_cases
from harness.goldens.store import SIZE_BUDGET_BYTES, total_size

REPO_GOLDENS = Path(__file__).resolve().parents[3] / "goldens"


def test_goldens_check_passes_on_the_repository():
    report = check_goldens(REPO_GOLDENS)
    assert report.exit_code == 0, format_check(report)
    checked = {o.case for o in report.outcomes}
    assert {c.name for c in all_cases()} | {"chat"} == checked
    assert not [n for n in report.notes if "stray file" in n or "unknown case" in n], report.notes


def test_committed_goldens_have_provenance_and_fit_the_budget():
    assert total_size(REPO_GOLDENS) <= SIZE_BUDGET_BYTES
    manifest = json.loads((REPO_GOLDENS / "manifest.json").read_text())
    assert set(manifest["cases"]) == {c.name for c in all_cases()}
    for name, entry in manifest["cases"].items():
        assert entry["command"].startswith("gemma4-harness goldens record"), name
        assert entry["seed"] == 0 and entry["dtype"] in ("float64", "float32"), name
        assert {"python", "torch", "transformers", "megatron-core", "platform"} <= set(entry["producer"]), (
            name
        )
        assert all(len(sha) == 64 for sha in entry["files"].values()), name

"""The committed goldens, one test per case (the test id is the case name), plus provenance and the budget.

This is how ``tox -e unit`` runs ``gemma4-harness goldens check`` (in-process, on the repository's goldens/).
One case: ``pytest "tests/unit/harness/goldens/test_goldens_repo.py::test_golden[forward/tiny-31b/float64]"`` (or
``-k "forward/tiny-31b/float64"``). A case that needs reference data which is missing (the chat cases without
the released templates) is skipped with the lookup's message, or fails under ``GEMMA4_REQUIRE_SHARED=1``.

``pytest --goldens-update``: a case whose check is not ok is re-recorded through the record command's code path
(atomic, with provenance), and the test fails once saying so; without the option nothing is ever written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.goldens.check import gate_case
from harness.goldens.registry import all_cases
from harness.goldens.store import SIZE_BUDGET_BYTES, read_manifest, stray_files, total_size
from harness.reference_data import REQUIRE_SHARED_ENV

REPO_GOLDENS = Path(__file__).resolve().parents[4] / "goldens"
CASES = [c.name for c in all_cases()]


def gate(name: str, goldens_dir: Path, update: bool) -> None:
    """Check one case; fail with its outcome, skip when reference data is unavailable (fail under
    ``GEMMA4_REQUIRE_SHARED=1``); with ``update``, re-record it first (:func:`gate_case`)."""
    verdict, message = gate_case(goldens_dir, name, update)
    if verdict == "skip":
        if os.environ.get(REQUIRE_SHARED_ENV, "").strip() not in ("", "0"):
            pytest.fail(f"{message} [{REQUIRE_SHARED_ENV}=1: reference data is required]", pytrace=False)
        pytest.skip(message)
    if verdict == "fail":
        pytest.fail(message, pytrace=False)


@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_golden(name: str, request: pytest.FixtureRequest) -> None:
    gate(name, REPO_GOLDENS, request.config.getoption("--goldens-update"))


def test_committed_goldens_have_provenance_and_fit_the_budget():
    assert total_size(REPO_GOLDENS) <= SIZE_BUDGET_BYTES
    manifest = read_manifest(REPO_GOLDENS)
    assert set(manifest["cases"]) == set(CASES)
    assert not stray_files(REPO_GOLDENS, manifest)
    assert "delegated" not in manifest
    for name, entry in manifest["cases"].items():
        assert entry["command"].startswith("gemma4-harness goldens record"), name
        assert {"python", "torch", "transformers", "megatron-core", "platform"} <= set(entry["producer"]), (
            name
        )
        assert all(len(sha) == 64 for sha in entry["files"].values()), name
        assert isinstance(entry.get("tolerance"), str) and entry.get("recorded_at"), name
        if entry["family"] == "chat":
            assert {"tokenizers", "jinja2"} <= set(entry["producer"]), name
            assert len(entry["template_sha256"]) == 64 and entry["tokenizer"]["tokenizer_json_sha256"], name
        else:
            assert entry["seed"] == 0 and entry["dtype"] in ("float64", "float32"), name
            assert isinstance(entry["config"], dict), name
    assert json.loads((REPO_GOLDENS / "manifest.json").read_text()) == manifest

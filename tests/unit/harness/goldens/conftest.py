"""Fixtures: a small set of goldens recorded once per session, copied fresh for every test that damages it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.goldens.record import record_goldens

# One case of each computed family, on the smaller preset: every code path at a fraction of the cost.
SMALL = ["forward/tiny-12b/float64", "rope/tiny-12b/float32", "weights/tiny-12b/float32"]


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine goldens directory holding :data:`SMALL` (do not modify: use ``goldens``)."""
    directory = tmp_path_factory.mktemp("recorded") / "goldens"
    record_goldens(directory, SMALL, command="pytest fixture")
    return directory


@pytest.fixture
def goldens(recorded: Path, tmp_path: Path) -> Path:
    """A private copy of the recorded goldens."""
    target = tmp_path / "goldens"
    shutil.copytree(recorded, target)
    return target

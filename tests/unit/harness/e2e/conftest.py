"""Fixtures for the e2e RL smoke tests: runs are cached per config within a test session (each takes a few
seconds), so the layout tests can compare against the single-process run without running it twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from harness.e2e.run import E2EConfig, run_e2e

_CACHE: dict[E2EConfig, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def e2e() -> Callable[..., dict[str, Any]]:
    """``e2e(**config)`` -> the run's result, computed once per config per session (never for mutants)."""

    def run(**kwargs: Any) -> dict[str, Any]:
        cfg = E2EConfig(**kwargs)
        if cfg not in _CACHE:
            _CACHE[cfg] = run_e2e(cfg)
        return _CACHE[cfg]

    return run


def describe(result: dict[str, Any]) -> str:
    """The failures of a run, for assertion messages."""
    lay = result["layout"]
    return f"{result['preset']} {result['dtype']} tp{lay['tp']} ep{lay['ep']}: " + "; ".join(
        result["failures"]
    )


@pytest.fixture(scope="session")
def explain() -> Callable[[dict[str, Any]], str]:
    """:func:`describe` as a fixture (test modules here are not a package)."""
    return describe

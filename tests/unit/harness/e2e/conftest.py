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


@pytest.fixture
def plant_old_expert_names(monkeypatch) -> None:
    """The converter as it once was: experts sent as ``experts.{e}.gate_up_proj`` /
    ``experts.{e}.down_proj`` (names SGLang 0.5.23 skips without a word)."""
    import torch

    import harness.e2e.sync as e2e_sync

    real = e2e_sync.convert_gemma4_to_hf

    def old_names(args, name, param):
        out = real(args, name, param)
        if out and ".experts." in out[0][0]:
            head = out[0][0].rsplit(".", 2)[0]
            if out[0][0].endswith("down_proj.weight"):
                return [(f"{head}.down_proj", out[0][1])]
            return [(f"{head}.gate_up_proj", torch.cat([out[0][1], out[1][1]]))]
        return out

    monkeypatch.setattr(e2e_sync, "convert_gemma4_to_hf", old_names)


@pytest.fixture(scope="session")
def explain() -> Callable[[dict[str, Any]], str]:
    """:func:`describe` as a fixture (test modules here are not a package)."""
    return describe

"""Shared pytest setup: hypothesis profiles, quiet megatron imports, one thread per worker, and the gate for
reference data that is not ours (``require_reference``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from harness.reference_data import REQUIRE_SHARED_ENV, ReferenceDataUnavailable, reference_path

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*")

# CI profile: derandomized (the same examples every run, so a red CI is reproducible), no deadline
# (2 shared cores make wall time noisy; speed is measured in benchmarks/, not in tests).
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", deadline=None, max_examples=200, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(1)


def require_reference_data(relative: str) -> Path:
    """Path of ``shared/reference/<relative>`` for a test that needs reference data that is not ours.

    When it is missing the test is skipped with a reason that says how to provide it (``GEMMA4_SHARED_DIR``);
    with ``GEMMA4_REQUIRE_SHARED=1`` (CI, ``.ci/run``) it fails with the same message instead, so that
    missing data can never pass as a skip.
    """
    try:
        return reference_path(relative)
    except ReferenceDataUnavailable as exc:
        if os.environ.get(REQUIRE_SHARED_ENV, "").strip() not in ("", "0"):
            pytest.fail(f"{exc} [{REQUIRE_SHARED_ENV}=1: reference data is required here]", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def require_reference() -> Callable[[str], Path]:
    """:func:`require_reference_data` as a fixture: ``require_reference("gemma4/chat_template.jinja")``."""
    return require_reference_data


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--impl``: the implementation under test of the parity tests (fixture ``impl``).
    ``--goldens-update``: the per-case goldens gate (tests/unit/harness/goldens/test_goldens_repo.py) re-records each
    case whose check is not ok, through ``gemma4-harness goldens record``'s code path, then fails it once."""
    parser.addoption(
        "--goldens-update",
        action="store_true",
        default=False,
        help="re-record every golden whose check fails (then the test fails once: review the diff and rerun)",
    )
    parser.addoption(
        "--impl",
        default=None,
        metavar="NAME|module:attr",
        help="implementation under test for the parity tests (the `impl` fixture; default gemma4-mcore, "
        "ours): gemma4-mcore, slime-pr2135, slime-pr2135+fixes, slime-pr2135+FIX[,FIX], or module:attr",
    )


@pytest.fixture(scope="session")
def impl(request: pytest.FixtureRequest):
    """The implementation under test named by ``--impl`` (default: ours, :data:`harness.parity.impl.OURS`).
    Reference data it needs that is missing skips (fails under ``GEMMA4_REQUIRE_SHARED=1``) with the reason."""
    from harness.impls import resolve_impl

    chosen = resolve_impl(request.config.getoption("--impl"))
    if chosen.name.startswith("slime-pr2135"):
        require_reference_data("slime-pr2135")
        require_reference_data("megatron-lm")
    return chosen


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Readable ids: ``float64`` (not ``dtype0``) for torch dtypes, the layout name for a ``RunLayout``."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    name = getattr(val, "name", None)
    if type(val).__name__ == "RunLayout" and isinstance(name, str):
        return name
    return None

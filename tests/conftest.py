"""Shared pytest setup: hypothesis profiles, quiet megatron imports, one thread per worker."""

from __future__ import annotations

import os
import warnings

import torch
from hypothesis import HealthCheck, settings

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

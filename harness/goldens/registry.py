"""The golden case families and the case list.

A family is a module with ``NAME``, ``DESCRIPTION``, ``cases() -> list[Case]``, ``record(case) -> Recording``,
``check(case, entry, files, goldens_dir) -> Outcome`` and ``describe_change(case, old_files, new) -> str``.
Adding one is a new module plus one line in :data:`FAMILY_MODULES` (one not written yet may be listed in
:data:`PENDING`, so that ``--only`` says why it has no cases). Every family lives in the one store
(:mod:`harness.goldens.store`): one manifest, content-addressed files, the same provenance.

Case names are ``family/preset/dtype`` (model families) or ``chat/<template>/<conversation>``; ``--only``
takes a case name, a family name, a prefix (``forward/tiny-31b``) or a shell pattern (``*/tiny-12b/*``), and
may repeat.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from gemma4.errors import InvalidInputError

# Dense (31B, 12B), MoE (26B-A4B; the router family takes the presets with MoE layers), PLE + KV sharing (E2B, E4B).
GOLDEN_PRESETS = ("tiny-31b", "tiny-12b", "tiny-26b-a4b", "tiny-e2b", "tiny-e4b")
GOLDEN_DTYPES = ("float64", "float32")  # bf16 logits are left out: CPU bf16 kernels differ across CPUs
SEED = 0

FAMILY_MODULES = {
    "forward": "harness.goldens.forward",
    "rope": "harness.goldens.rope",
    "weights": "harness.goldens.weights",
    "router": "harness.goldens.router",
    "chat": "harness.goldens.chat",
}
PENDING: dict[str, str] = {}  # family name -> why it has no cases yet


@dataclass(frozen=True)
class Case:
    """One golden case: ``family/preset/dtype``, recorded from the preset with ``seed``."""

    family: str
    preset: str
    dtype: str
    seed: int = SEED

    @property
    def name(self) -> str:
        return f"{self.family}/{self.preset}/{self.dtype}"

    def identity(self) -> dict[str, Any]:
        """The manifest fields that say which case an entry is."""
        return {"family": self.family, "preset": self.preset, "dtype": self.dtype, "seed": self.seed}


@dataclass
class Recording:
    """What a family computed for a case: file payloads by suffix and the manifest fields it adds."""

    files: dict[str, bytes]
    fields: dict[str, Any] = field(default_factory=dict)


def family(name: str) -> ModuleType:
    """The module implementing family ``name``."""
    return importlib.import_module(FAMILY_MODULES[name])


def standard_cases(family_name: str) -> list[Case]:
    """Every golden preset x dtype for one family."""
    return [Case(family_name, p, d) for p in GOLDEN_PRESETS for d in GOLDEN_DTYPES]


def all_cases() -> list[Any]:
    """Every case of every family, in a fixed order (objects with ``family``, ``name`` and ``identity()``)."""
    return [c for name in FAMILY_MODULES for c in family(name).cases()]


def all_names() -> list[str]:
    """Every case name."""
    return [c.name for c in all_cases()]


def _matches(token: str, name: str) -> bool:
    return name == token or name.startswith(token.rstrip("/") + "/") or fnmatch.fnmatchcase(name, token)


def select(only: list[str] | None) -> list[Any]:
    """Cases chosen by ``--only`` tokens (every case when ``only`` is empty), in the fixed order."""
    cases = all_cases()
    if not only:
        return cases
    chosen: list[Any] = []
    for token in only:
        hits = [c for c in cases if _matches(token, c.name)]
        if not hits:
            if token in PENDING:
                raise InvalidInputError(f"--only {token!r}: {PENDING[token]}")
            raise InvalidInputError(
                f"--only {token!r} matches no golden case; cases: {', '.join(all_names())}"
            )
        chosen += [c for c in hits if c not in chosen]
    order = {c.name: i for i, c in enumerate(cases)}
    return sorted(chosen, key=lambda c: order[c.name])

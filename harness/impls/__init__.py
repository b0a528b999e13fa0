"""Implementations under test (see ``harness/parity/impl.py``) by name, for ``--impl NAME|module:attr``.

* ``gemma4-mcore``: this repo's model (:data:`harness.parity.impl.OURS`, the default);
* ``slime-pr2135``: slime PR #2135's Gemma 4 as written (:mod:`harness.impls.slime_pr2135`, needs
  ``shared/reference/slime-pr2135``); ``slime-pr2135+fixes``: with every fix of its findings applied from
  outside; ``slime-pr2135+FIX[,FIX...]``: with those fixes only (``layer_types``, ``global_rope``,
  ``sliding_window``, ``fp64_islands``, ``kv_heads_below_tp``);
* ``module:attr``: any object satisfying :class:`~harness.parity.impl.ImplementationUnderTest` (a class or a
  factory is called without arguments).
"""

from __future__ import annotations

import importlib

from gemma4.errors import InvalidInputError
from harness.parity.impl import OURS, PRECISIONS, ImplementationUnderTest


def _slime(fixes: tuple[str, ...] = ()) -> ImplementationUnderTest:
    from harness.impls.slime_pr2135 import SlimePR2135

    return SlimePR2135(fixes=fixes)


def _slime_fixed() -> ImplementationUnderTest:
    from harness.impls.slime_pr2135 import ALL_FIXES

    return _slime(ALL_FIXES)


#: Named implementations (factories, so naming one imports nothing heavy).
IMPLS = {
    "gemma4-mcore": lambda: OURS,
    "slime-pr2135": _slime,
    "slime-pr2135+fixes": _slime_fixed,
}

DEFAULT_IMPL = "gemma4-mcore"


def impl_help() -> str:
    return (
        "implementation under test: " + ", ".join(IMPLS) + f" (default {DEFAULT_IMPL}), "
        "slime-pr2135+FIX[,FIX...], or module:attr"
    )


def resolve_impl(name: str | None, flag: str = "--impl") -> ImplementationUnderTest:
    """The implementation named ``name`` (``None``: ours). Anything unusable is invalid input naming ``flag``."""
    if name is None or name == DEFAULT_IMPL:
        return OURS
    if name in IMPLS:
        return IMPLS[name]()
    if name.startswith("slime-pr2135+"):
        from harness.impls.slime_pr2135 import parse_fixes

        try:
            return _slime(parse_fixes(name.split("+", 1)[1]))
        except InvalidInputError as exc:
            raise InvalidInputError(f"{flag} {name}: {exc}") from None
    if ":" not in name:
        raise InvalidInputError(f"{flag} {name!r} is unknown; {impl_help()}")
    module, _, attr = name.partition(":")
    try:
        obj = importlib.import_module(module)
    except Exception as exc:
        raise InvalidInputError(f"{flag} {name}: cannot import module {module!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidInputError(f"{flag} {name}: module {module!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, ImplementationUnderTest)):
        try:
            obj = obj()
        except Exception as exc:
            raise InvalidInputError(f"{flag} {name}: calling {attr} failed: {exc}") from None
    if not isinstance(obj, ImplementationUnderTest):
        raise InvalidInputError(
            f"{flag} {name}: {type(obj).__name__} is not an implementation under test "
            "(needs name, precision, supports(spec), run(...): harness/parity/impl.py)"
        )
    if obj.precision not in PRECISIONS:
        raise InvalidInputError(
            f"{flag} {name}: precision {obj.precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    return obj

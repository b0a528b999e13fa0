"""Progress bars for long runs: tqdm on a terminal, silent otherwise (CI logs, pipes, tests)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, enabled: bool | None = None, total: int | None = None
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on stderr when ``enabled`` (default: stderr is a TTY)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)

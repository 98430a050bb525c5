"""Process-parallel map with a progress bar, used by every per-tile command."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per available core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pmap(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int | None = None,
    desc: str = "",
    total: int | None = None,
) -> Iterator[R]:
    """Apply ``fn`` to ``items`` over ``workers`` processes, yielding results in input order.

    ``workers=1`` runs in this process (no pickling; easiest to debug). The progress bar goes to stderr and
    hides itself when stderr is not a terminal.
    """
    items = list(items)
    workers = default_workers() if workers is None else max(1, workers)
    bar = tqdm(total=total or len(items), desc=desc, unit="tile", disable=None, leave=False)
    try:
        if workers == 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        chunk = max(1, min(16, len(items) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(fn, items, chunksize=chunk):
                yield result
                bar.update()
    finally:
        bar.close()

"""Joining Ray: the one place a driver, the ensemble job or the demo connects to a cluster or starts one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray


@contextmanager
def connected(local_dashboard: bool = True) -> Iterator[bool]:
    """Connect to the cluster at ``RAY_ADDRESS`` (or the one ``ray start`` left on this machine); with neither,
    start a local Ray for the duration. Already connected: nothing changes. Yields whether this call connected;
    a connection it made is closed on exit. ``local_dashboard``: whether a Ray started here runs its dashboard.
    Workers' output goes to Ray's log files, not the caller's terminal (``log_to_driver=False``)."""
    if ray.is_initialized():
        yield False
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {} if address or local_dashboard else {"include_dashboard": False}
    ray.init(address=address, log_to_driver=False, **kwargs)
    try:
        yield True
    finally:
        ray.shutdown()


def connect() -> None:
    """Connect as :func:`connected` does, for the rest of the process (a driver's or job's lifetime)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)

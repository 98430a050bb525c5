"""What a driver gives the scheduler and callbacks that Tune unpickles when it restores an experiment."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from geopose_ray.sweep.files import SweepFiles
from geopose_ray.sweep.table import SweepTable
from geopose_ray.tracking import Tracker


@dataclasses.dataclass
class Restoring:
    """What the driver whose Tuner is being built and run gives the scheduler and callbacks that Tune restores from
    the pickle an earlier driver left (maybe on another head, in another directory): its own files, MLflow client
    and results table, in place of the pickled ones."""

    files: SweepFiles
    tracker: Tracker | None = None
    table: SweepTable | None = None
    preempt_folds: bool | None = None  # the config's preempt_fold_runs (None: as pickled)


_RESTORING: list[Restoring] = []


@contextmanager
def restoring_into(
    files: SweepFiles,
    tracker: Tracker | None = None,
    table: SweepTable | None = None,
    preempt_folds: bool | None = None,
) -> Iterator[Restoring]:
    """While a driver builds and runs a Tuner (Tune unpickles what it restores in ``Tuner.restore``)."""
    _RESTORING.append(Restoring(files, tracker, table, preempt_folds))
    try:
        yield _RESTORING[-1]
    finally:
        _RESTORING.pop()

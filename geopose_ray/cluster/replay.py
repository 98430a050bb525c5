"""Checkpoints Tune lost track of: the epochs a trial completed and persisted but Tune never registered."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from geopose_ray.engine.checkpoint import load_checkpoint
from geopose_ray.engine.trainer import LAST
from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_text

log = logging.getLogger(__name__)


REPORTED = "reported.json"  # beside last.pt in every trial checkpoint: the metrics reported with it
CHECKPOINT_DIR = re.compile(r"checkpoint_\d+")


def _reported(directory: Path) -> dict[str, Any] | None:
    """The metrics a checkpoint directory was reported with; None if it has none or is incomplete."""
    try:
        metrics = json.loads((directory / REPORTED).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or "epoch" not in metrics or not (directory / LAST).is_file():
        return None
    return metrics


def _unregistered(checkpoint: tune.Checkpoint) -> list[tuple[Path, int]]:
    """The trial's checkpoints of the epochs right after the one Tune restores, complete on storage but never
    registered by Tune, oldest first, with their epochs (by their reported.json; :func:`_take_up` checks last.pt).

    Tune handles a reported checkpoint in two steps: it processes the result (scheduler, searcher, callbacks,
    result.json) and then asks the trial to save, which registers the checkpoint the worker had already
    persisted. A worker lost between the two (a pre-empted node), or a driver killed before its experiment
    snapshot caught up, makes Tune restore the checkpoint before; training from it would train completed epochs
    again. These are the epochs to take up instead (see :func:`_replay`). Only on a local or shared filesystem,
    where the trial's checkpoint directories are siblings; on remote storage the epochs are retrained.
    """
    if getattr(checkpoint.filesystem, "type_name", "") != "local":  # pyarrow's LocalFileSystem
        return []
    registered = Path(checkpoint.path)
    base = _reported(registered)
    if base is None or not registered.parent.is_dir():
        return []
    by_epoch: dict[int, Path] = {}
    for d in registered.parent.iterdir():
        if d != registered and d.is_dir() and CHECKPOINT_DIR.fullmatch(d.name):
            metrics = _reported(d)
            if metrics is not None:
                by_epoch[int(metrics["epoch"])] = d
    chain = []
    epoch = int(base["epoch"]) + 1
    while epoch in by_epoch:  # contiguous only: an epoch missing from storage is trained again, as is all after it
        chain.append((by_epoch[epoch], epoch))
        epoch += 1
    return chain


def _take_up(directory: Path, work: Path, epoch: int) -> dict[str, Any] | None:
    """Copy an unregistered checkpoint's last.pt into ``work`` if it is complete: it loads and holds ``epoch``
    (a node lost while the worker persisted it leaves a torn copy). Returns the metrics it was reported with;
    None, with ``work`` as it was, if it is incomplete, torn or of another epoch."""
    metrics = _reported(directory)
    if metrics is None or int(metrics["epoch"]) != epoch:
        return None
    candidate = work / f".{LAST}.candidate"
    try:
        shutil.copy(directory / LAST, candidate)
        complete = int(load_checkpoint(candidate)["epoch"]) == epoch
    except (OSError, DataError, KeyError, TypeError, ValueError):
        complete = False
    if not complete:
        candidate.unlink(missing_ok=True)
        return None
    os.replace(candidate, work / LAST)
    atomic_write_text(work / REPORTED, json.dumps(metrics))
    return metrics


def _replay(checkpoints: list[tuple[Path, int]], work: Path) -> None:
    """Take up unregistered checkpoints (:func:`_unregistered`): report each epoch again, with its own metrics
    (marked ``replayed``) and its checkpoint, without training it. The scheduler, searcher and callbacks see
    every epoch in order, as if the trial had never been interrupted: a result they already had changes
    nothing (the promoter and the guided order are idempotent per epoch), one they missed (a killed driver) is
    acted on, and the trial goes on from the last one only if the scheduler lets it continue. The first that is
    torn or rewritten meanwhile ends the replay: training goes on from the last one taken up."""
    for d, epoch in checkpoints:
        metrics = _take_up(d, work, epoch)
        if metrics is None:
            log.warning("not taking up %s: incomplete, torn or not epoch %d", d, epoch)
            return
        log.warning("taking up epoch %d from %s, which Tune had not registered", epoch, d)
        tune.report({**metrics, "replayed": 1.0}, checkpoint=tune.Checkpoint.from_directory(str(work)))

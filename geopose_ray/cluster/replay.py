"""Checkpoints Tune lost track of: the epochs a trial completed and persisted but Tune never registered. One scan
of a trial's checkpoints on any ``pyarrow.fs`` filesystem serves both the trainable (which epochs to take up) and
the driver (the newest checkpoint of a trial whose results Tune lost)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune

from geopose_ray.engine.checkpoint import load_checkpoint
from geopose_ray.engine.trainer import LAST
from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_text

log = logging.getLogger(__name__)


REPORTED = "reported.json"  # beside last.pt in every trial checkpoint: the metrics reported with it
CHECKPOINT_DIR = re.compile(r"checkpoint_\d+")


@dataclass(frozen=True)
class Stored:
    """A trial checkpoint on storage complete enough to use: its metrics (``reported.json``, with an epoch) and a
    non-empty ``last.pt`` beside them."""

    path: str  # the checkpoint directory, on its filesystem
    epoch: int  # the epoch it holds, as reported
    metrics: dict[str, Any]  # what the trial reported with it


def complete(fs: pyarrow.fs.FileSystem, directory: str) -> Stored | None:
    """Checkpoint directory ``directory`` on ``fs``, if it is complete (:class:`Stored`); None if it is not, or
    cannot be read."""
    try:
        with fs.open_input_stream(f"{directory}/{REPORTED}") as f:
            metrics = json.loads(f.read())
        model = fs.get_file_info(f"{directory}/{LAST}")
    except (OSError, ValueError):
        return None
    if model.type != pyarrow.fs.FileType.File or not model.size:
        return None  # torn: the worker was lost while it persisted the checkpoint
    epoch = metrics.get("epoch") if isinstance(metrics, dict) else None
    if not isinstance(epoch, int | float) or isinstance(epoch, bool):
        return None
    return Stored(directory, int(epoch), metrics)


def stored_checkpoints(fs: pyarrow.fs.FileSystem, trial_dir: str) -> list[Stored]:
    """Every complete checkpoint directory (``checkpoint_<n>``) of a trial on ``fs``, in the order of their
    names; none if the trial's directory cannot be listed."""
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(trial_dir))
    except OSError:
        return []
    out = []
    for info in sorted(found, key=lambda i: i.base_name):
        if info.type == pyarrow.fs.FileType.Directory and CHECKPOINT_DIR.fullmatch(info.base_name):
            stored = complete(fs, info.path)
            if stored is not None:
                out.append(stored)
    return out


def newest(fs: pyarrow.fs.FileSystem, trial_dir: str) -> Stored | None:
    """The trial's complete checkpoint with the highest epoch (the first by name among equals); None if none."""
    best: Stored | None = None
    for stored in stored_checkpoints(fs, trial_dir):
        if best is None or stored.epoch > best.epoch:
            best = stored
    return best


def _unregistered(checkpoint: tune.Checkpoint) -> list[tuple[Path, int]]:
    """The trial's checkpoints of the epochs right after the one Tune restores, complete on storage but never
    registered by Tune, oldest first, with their epochs (:func:`_take_up` checks that last.pt loads).

    Tune handles a reported checkpoint in two steps: it processes the result (scheduler, searcher, callbacks,
    result.json) and then asks the trial to save, which registers the checkpoint the worker had already
    persisted. A worker lost between the two (a pre-empted node), or a driver killed before its experiment
    snapshot caught up, makes Tune restore the checkpoint before; training from it would train completed epochs
    again. These are the epochs to take up instead (see :func:`_replay`). Only on a local or shared filesystem,
    where the trial's checkpoint directories are siblings; on remote storage the epochs are retrained.
    """
    fs = checkpoint.filesystem
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        return []
    registered = Path(checkpoint.path)
    base = complete(fs, str(registered))
    if base is None:
        return []
    stored = stored_checkpoints(fs, str(registered.parent))
    by_epoch = {s.epoch: Path(s.path) for s in stored if Path(s.path) != registered}
    chain = []
    epoch = base.epoch + 1
    while epoch in by_epoch:  # contiguous only: an epoch missing from storage is trained again, as is all after it
        chain.append((by_epoch[epoch], epoch))
        epoch += 1
    return chain


def _take_up(directory: Path, work: Path, epoch: int) -> dict[str, Any] | None:
    """Copy an unregistered checkpoint's last.pt into ``work`` if it is complete: it loads and holds ``epoch``
    (a node lost while the worker persisted it leaves a torn copy). Returns the metrics it was reported with;
    None, with ``work`` as it was, if it is incomplete, torn or of another epoch."""
    stored = complete(pyarrow.fs.LocalFileSystem(), str(directory))
    if stored is None or stored.epoch != epoch:
        return None
    metrics = stored.metrics
    candidate = work / f".{LAST}.candidate"
    try:
        shutil.copy(directory / LAST, candidate)
        loads = int(load_checkpoint(candidate)["epoch"]) == epoch
    except (OSError, DataError, KeyError, TypeError, ValueError):
        loads = False
    if not loads:
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

"""An ensemble's members: a sweep's finalists (or a named list), each with one checkpoint per fold, found in the
sweep's ``trials.json`` and checked before any inference starts (on remote storage, by the worker that loads
them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geopose_ray.engine.checkpoint import load_checkpoint
from geopose_ray.engine.trainer import BEST, LAST, TOP_LIST
from geopose_ray.errors import DataError
from geopose_ray.storage import is_remote, join, read_text, redact, stat
from geopose_ray.sweep.files import TRIALS
from geopose_ray.sweep.records import Stage, SweepRecords, TrialRecord


@dataclass(frozen=True)
class FoldModel:
    """One trained model of a member: validated on ``val_fold``, which it never trained on."""

    key: str  # "<trial>" (the screening run) or "<trial>/fold<k>"
    checkpoint: str  # best.pt (the best validation epoch), else last.pt: a path, or a URI on remote storage
    val_fold: int
    # With the trial's top_k > 1: its other kept checkpoints (top-{epoch}.pt, best first after `checkpoint`),
    # whose predictions are averaged with the best's as one model of the member.
    extra: tuple[str, ...] = ()

    @property
    def checkpoints(self) -> tuple[str, ...]:
        return (self.checkpoint, *self.extra)


@dataclass(frozen=True)
class Member:
    """One configuration of the ensemble with its fold models."""

    name: str  # the screening trial id
    label: str  # encoder / decoder, lr, accumulation: for tables and plots
    folds: tuple[FoldModel, ...]


def _fold_model(key: str, record: TrialRecord) -> FoldModel:
    """The fold model of a trial: its best.pt, and its other top-k checkpoints when it kept more than one."""
    best = _checkpoint(record)
    extra: tuple[str, ...] = ()
    if int(record.cfg.get("top_k", 1) or 1) > 1 and record.checkpoint:
        listed = read_text(join(record.checkpoint, TOP_LIST))
        if listed is not None:
            try:
                files = [str(d["file"]) for d in json.loads(listed)]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{redact(join(record.checkpoint, TOP_LIST))}: malformed ({e}); rerun its trial") from e
            extra = tuple(join(record.checkpoint, f) for f in files[1:])  # the first is best.pt's epoch
    return FoldModel(key, best, int(record.cfg["val_fold"]), extra)


def _checkpoint(record: TrialRecord) -> str:
    key = record.key
    if record.error:
        raise DataError(f"fold model {key} failed in the sweep ({record.error}); rerun the sweep or leave it out")
    directory = record.checkpoint
    if not directory:
        raise DataError(f"fold model {key} has no checkpoint in trials.json; rerun the sweep with --resume")
    for name in (BEST, LAST):
        location = join(directory, name)
        if stat(location) is not None:
            return location
    raise DataError(f"{redact(directory)}: no {BEST} or {LAST} for fold model {key}; was the sweep's storage moved?")


def find_members(sweep_dir: str | Path, names: list[str] | None = None) -> list[Member]:
    """The members of an ensemble from a sweep's ``trials.json``: every finalist by default, or ``names``.

    Raises:
        DataError: no finished sweep, a malformed trials.json, no finalists, an unknown name, or a fold model
            without a checkpoint.
    """
    path = join(sweep_dir, TRIALS)
    text = read_text(path)
    if text is None:
        raise DataError(f"{redact(path)}: no finished sweep here (trials.json missing); run sweeps/screen.py first")
    saved = SweepRecords.from_json(text, redact(path))
    trials = saved.trials
    chosen = list(names) if names else list(saved.finalists)
    if not chosen:
        raise DataError(
            f"sweep {saved.sweep!r} has no finalists to ensemble; give members by name (--members), or "
            "raise its budget or rungs with sweeps/promote.py"
        )
    screened = sorted(k for k, r in trials.items() if r.stage == Stage.SCREEN)
    members = []
    for name in chosen:
        if name not in trials or trials[name].stage != Stage.SCREEN:
            raise DataError(f"no screening trial {name!r} in {redact(path)}; the trials are {screened}")
        record = trials[name]
        cfg = record.cfg
        folds = [_fold_model(name, record)]
        for key, r in sorted(trials.items()):
            if r.stage == Stage.FOLD and r.key.trial == name:
                folds.append(_fold_model(key, r))
        model = cfg["model"]
        label = f"{model['decoder']}/{model['encoder']} lr {cfg['lr']:.2g} acc {cfg['accumulation']}"
        members.append(Member(name, label, tuple(sorted(folds, key=lambda f: f.val_fold))))
    return members


def check_members(members: list[Member], downsample: int) -> dict[str, Any]:
    """Check every fold model on local or shared storage before any inference: it must load, and be trained at
    the cache's resolution (``downsample``). Only the metadata is read (the tensors are memory-mapped). A fold
    model on remote storage is not downloaded here, to the head: the worker that loads it checks it the same
    way (:func:`check_fold_model`), and the job raises that worker's error. Returns the TrainConfig dict of each
    fold model checked here, by key."""
    configs: dict[str, Any] = {}
    for m in members:
        for f in m.folds:
            for location in f.checkpoints:
                if is_remote(location):
                    continue
                try:
                    state = load_checkpoint(location, mmap=True)
                    trained_at = int(state["downsample"])
                    configs.setdefault(f.key, state["config"])
                except (DataError, KeyError, TypeError, ValueError) as e:
                    raise unreadable(f, e) from e
                check_fold_model(f, trained_at, downsample)
    return configs


def unreadable(f: FoldModel, e: Exception) -> DataError:
    """The error for a fold model whose checkpoint does not load."""
    return DataError(f"{redact(f.checkpoint)}: cannot read fold model {f.key} ({e}); rerun its trial")


def check_fold_model(f: FoldModel, trained_at: int, downsample: int) -> None:
    """A fold model trained at another resolution (downsample factor) than the cache's cannot join the ensemble.

    Raises:
        DataError: naming the checkpoint and both resolutions.
    """
    if trained_at != downsample:
        raise DataError(
            f"{redact(f.checkpoint)}: fold model {f.key} was trained at 1/{trained_at} resolution, "
            f"the others and the cache at 1/{downsample}; members must share one input resolution"
        )

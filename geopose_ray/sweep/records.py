"""Trial keys, statuses and the records of trials: what names a trial in the promoter, the results table and
MLflow, and what ``trials.json`` holds. Pure: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from geopose_ray.errors import DataError

_FOLD = "/fold"


class TrialKey(str):
    """A trial's name in the promoter, the results table, MLflow's ``trial`` tag and ``trials.json``: a screening
    trial's id (``<trial>``), or a finalist's run on another fold (``<trial>/fold<k>``). A ``str``: it is written
    to every file as that text, and text read back from any of them is made a key again by :meth:`parse`."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> TrialKey:
        """The key a name stands for (any text: one without ``/fold<k>`` at its end is a screening trial's)."""
        return text if isinstance(text, TrialKey) else cls(text)

    @classmethod
    def fold_of(cls, trial: str, fold: int) -> TrialKey:
        """The key of screening trial ``trial``'s run validated on fold ``fold``."""
        return cls(f"{trial}{_FOLD}{int(fold)}")

    def _split(self) -> tuple[str, int | None]:
        trial, sep, k = self.rpartition(_FOLD)
        return (trial, int(k)) if sep and trial and k.isdigit() else (str(self), None)

    @property
    def trial(self) -> str:
        """The screening trial: the key itself, or the trial a fold run is of."""
        return self._split()[0]

    @property
    def fold(self) -> int | None:
        """A fold run's validation fold; None for a screening trial (validated on the sweep's ``val_fold``)."""
        return self._split()[1]

    @property
    def is_fold_run(self) -> bool:
        """A finalist's run on another fold, not a screening trial."""
        return self.fold is not None

    @property
    def stage(self) -> Stage:
        return Stage.FOLD if self.is_fold_run else Stage.SCREEN


class Stage(StrEnum):
    """Which part of a sweep a trial belongs to (the ``stage`` column and tag)."""

    SCREEN = "screen"  # a grid point or a searcher's draw, under the promoter
    FOLD = "fold"  # a finalist trained on another fold, to the top rung


class Status(StrEnum):
    """Where a trial stands (the ``status`` column and tag)."""

    RUNNING = "running"  # training (a fold run, or a screening trial below its next rung)
    PROMOTED = "promoted"  # passed a rung, not yet reported beyond it
    PAUSED = "paused"  # held at a rung by the promoter (or a fold run pre-empted by a costlier one)
    FINALIST = "finalist"  # reached the top rung: done screening
    STOPPED = "stopped"  # a screening trial that ended neither paused nor a finalist
    DONE = "done"  # a fold run that reached the top rung
    ERRORED = "errored"  # failed; its record has the error's last line


def trial_key(trial_id: str, cfg: dict[str, Any]) -> tuple[TrialKey, dict[str, Any]]:
    """A trial's name in the promoter, the results table and MLflow, and its TrainConfig dict without the
    driver's private keys (``_threads``, ``_gpus``, ``_trial``, ``_finalist``, ``_resume_from``).

    The name is Tune's trial id, except for a finalist's fold run (``<screening trial>/fold<k>``) and a trial
    continued in a reopened sweep (``_trial``: the id it had when the sweep first ran it).
    """
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    parent = cfg.get("_finalist")
    if parent:
        return TrialKey.fold_of(str(parent), clean["val_fold"]), clean
    return TrialKey(str(cfg.get("_trial") or trial_id)), clean


def is_fold_run(key: str) -> bool:
    """A finalist's run on another fold (``<trial>/fold<k>``), not a screening trial."""
    return TrialKey.parse(key).is_fold_run


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's TrainConfig dict (with the driver's private keys), from either shape of param space: a
    grid point (``cfg``: the whole dict), or a searcher's draw (``sample``: encoder, decoder, lr, accumulation and
    an index into each named axis's values, built into a trial by the sweep config in ``sweep``, as the grid builds
    its points)."""
    if "cfg" in config:
        return dict(config["cfg"])
    if "sample" not in config:
        return {}
    from geopose_ray.sweep.config import SweepConfig

    s = config["sample"]
    sweep = SweepConfig.from_dict(config["sweep"])
    encoder = str(s["encoder"])
    point: dict[str, Any] = {"encoder": encoder, "decoder": str(s["decoder"]), "lr": float(s["lr"]),
                             "accumulation": int(s["accumulation"])}  # fmt: skip
    for axis in sweep.axes:  # drawn as an index into the drawn encoder's values of the axis
        point[axis] = sweep.grid.axis_values(axis, encoder)[int(s["axes"][axis])]
    return {**sweep.trial_config(point), **config.get("private", {})}


def per_epoch_hours(result: Mapping[str, Any]) -> float:
    """A trial's device hours per epoch from its last result (the wall-clock a run of it holds a worker for;
    GPU-hours where a result has no device hours); NaN if unknown."""
    epochs = float(result.get("epoch", 0) or 0)
    hours = float(result.get("device_hours") or result.get("gpu_hours") or math.nan)
    return hours / epochs if epochs > 0 else math.nan


EPOCH_HOURS = "_epoch_hours"  # in a fold run's config: its finalist's device hours per epoch when screened


@dataclass
class TrialRecord:
    """What the driver knows of one trial once a stage has finished: an entry of ``trials.json``."""

    key: TrialKey  # screening trial id, or "<screening trial>/fold<k>"
    stage: Stage  # screen | fold
    cfg: dict[str, Any]  # its TrainConfig dict
    metrics: dict[str, Any]  # its last reported result (numbers and text only)
    checkpoint: str | None  # its last checkpoint directory (last.pt and best.pt): a path, or a URI
    error: str | None = None  # the last line of its error, if it failed

    def to_dict(self) -> dict[str, Any]:
        """The record as ``trials.json`` holds it (plain JSON values)."""
        return {**dataclasses.asdict(self), "key": str(self.key), "stage": str(self.stage)}


@dataclass
class SweepRecords:
    """A finished stage's record of a sweep: the contents of ``trials.json``."""

    sweep: str  # the sweep's name
    round: int  # 0 for the sweep itself, n for its n-th reopening
    rungs: list[int]  # the promoter's rungs (epochs) when it was written
    finalists: list[str]  # screening trials that reached the top rung
    trials: dict[str, TrialRecord]  # every trial that reported or failed, by its key (a TrialKey)

    def to_json(self) -> str:
        return json.dumps(
            {
                "sweep": self.sweep,
                "round": self.round,
                "rungs": list(self.rungs),
                "finalists": list(self.finalists),
                "trials": {str(k): r.to_dict() for k, r in self.trials.items()},
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> SweepRecords:
        """Parse ``trials.json`` as any version of the driver wrote it (``round`` and ``rungs`` may be absent).

        Args:
            text: the file's contents.
            source: where they come from (a path, or a redacted URI), for the error.

        Raises:
            DataError: the text is not a sweep's trial records, naming ``source``, what is wrong and the fix.
        """
        try:
            return cls._parse(json.loads(text))
        except (ValueError, TypeError) as e:
            raise DataError(
                f"{source}: not a sweep's trial records ({e}); rerun the sweep with --resume to write it again"
            ) from None

    @classmethod
    def _parse(cls, d: Any) -> SweepRecords:
        if not isinstance(d, dict):
            raise TypeError(f"a JSON object expected, found {type(d).__name__}")
        trials = _typed(d, "trials", dict)
        records: dict[str, TrialRecord] = {}
        for name, r in trials.items():
            if not isinstance(r, dict):
                raise TypeError(f"trial {name!r}: a JSON object expected, found {type(r).__name__}")
            key = TrialKey.parse(name)
            if r.get("key", name) != name:
                raise ValueError(f"trial {name!r} is recorded under key {r['key']!r}")
            records[key] = TrialRecord(
                key=key,
                stage=_stage(name, r.get("stage")),
                cfg=_typed(r, "cfg", dict, name),
                metrics=_typed(r, "metrics", dict, name),
                checkpoint=_optional_text(r, "checkpoint", name),
                error=_optional_text(r, "error", name),
            )
        finalists = _typed(d, "finalists", list)
        rungs = d.get("rungs", [])
        if not all(isinstance(t, str) for t in finalists):
            raise TypeError("`finalists` must be a list of trial ids")
        if not isinstance(rungs, list) or not all(isinstance(n, int) for n in rungs):
            raise TypeError("`rungs` must be a list of epochs")
        return cls(str(_typed(d, "sweep", str)), int(d.get("round", 0)), list(rungs), list(finalists), records)


def _typed(d: dict[str, Any], name: str, kind: type, trial: str | None = None) -> Any:
    where = f"trial {trial!r}: " if trial is not None else ""
    if name not in d:
        raise ValueError(f"{where}no `{name}`")
    if not isinstance(d[name], kind):
        raise TypeError(f"{where}`{name}` must be a {kind.__name__}, not {type(d[name]).__name__}")
    return d[name]


def _optional_text(r: dict[str, Any], name: str, trial: str) -> str | None:
    v = r.get(name)
    if v is not None and not isinstance(v, str):
        raise TypeError(f"trial {trial!r}: `{name}` must be text or null, not {type(v).__name__}")
    return v


def _stage(trial: str, value: Any) -> Stage:
    try:
        return Stage(value)
    except ValueError:
        raise ValueError(f"trial {trial!r}: stage {value!r} is none of {[str(s) for s in Stage]}") from None

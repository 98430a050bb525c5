"""Ray Tune glue: the scheduler that dispatches the promoter's decisions, and the trial function.

The only module (with the driver) that imports Ray. The promotion rules live in :mod:`.promoter`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.engine.checkpoint import load_checkpoint
from geopose_ray.engine.trainer import LAST
from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.storage import copy_file, join
from geopose_ray.sweep.files import PROMOTER, RESULTS, SweepFiles
from geopose_ray.sweep.order import GuidedOrder, longest_first, pre_empts
from geopose_ray.sweep.plots import curves_plot
from geopose_ray.sweep.promoter import Decision, Promoter
from geopose_ray.tracking import Tracker, result_row, rows_csv

log = logging.getLogger(__name__)


def trial_key(trial_id: str, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A trial's name in the promoter, the results table and MLflow, and its TrainConfig dict without the
    driver's private keys (``_threads``, ``_gpus``, ``_trial``, ``_finalist``, ``_resume_from``).

    The name is Tune's trial id, except for a finalist's fold run (``<screening trial>/fold<k>``) and a trial
    continued in a reopened sweep (``_trial``: the id it had when the sweep first ran it).
    """
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    parent = cfg.get("_finalist")
    if parent:
        return f"{parent}/fold{clean['val_fold']}", clean
    return str(cfg.get("_trial") or trial_id), clean


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's TrainConfig dict (with the driver's private keys), from either shape of param space: a
    grid point (``cfg``: the whole dict), or a searcher's draw (``sample``: encoder, decoder, lr, accumulation,
    built into a trial by the sweep config in ``sweep``, as the grid builds its points)."""
    if "cfg" in config:
        return dict(config["cfg"])
    if "sample" not in config:
        return {}
    from geopose_ray.sweep.config import SweepConfig

    s = config["sample"]
    built = SweepConfig.from_dict(config["sweep"]).trial_config(
        str(s["encoder"]), str(s["decoder"]), float(s["lr"]), int(s["accumulation"])
    )
    return {**built, **config.get("private", {})}


GUIDED_AXES = ("encoder", "decoder", "lr", "accumulation")


class GuidedSearch(Searcher):
    """Every point of a grid exactly once, in a :class:`GuidedOrder` that learns from the first-rung scores, then
    each finalist's runs on the other folds as soon as it is a finalist.

    Ray Tune asks for a trial whenever it has room for one more pending trial (the driver sets how many, its
    ``pending_trials``); each answer is the grid point the order picks with what the first rung has shown by
    then. Once every grid point has started, the answers are fold runs (``folds``: the other validation folds;
    trained to ``top`` epochs) of the trials that have finished the top rung, the most expensive finalist's
    first (its hours per epoch, which each fold run's config carries as ``_epoch_hours``;
    :func:`~geopose_ray.sweep.order.longest_first`). The scheduler ranks them after every promotion and new trial,
    so they fill the workers screening leaves idle (Tune starts pending trials as resources free up: the ranking is
    a priority), and lets a waiting one of a costlier architecture pre-empt a running one. None means
    "nothing yet" (a finalist may still come); FINISHED once screening is over and every fold run has been
    handed out. Its state is pickled with the experiment, so a restarted driver goes on where it stopped.
    """

    def __init__(
        self,
        points: list[dict[str, Any]],
        first_rung: int,
        seed: int,
        metric: str,
        mode: str,
        folds: list[int] | None = None,
        top: int | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        axes = [{**p["model"], "lr": p["lr"], "accumulation": p["accumulation"]} for p in points]
        self.order = GuidedOrder(axes, axes=GUIDED_AXES, seed=seed)
        self.points = points
        self.first_rung = first_rung
        self.folds = list(folds or [])
        self.top = top
        self.index: dict[str, int] = {}  # Tune trial id -> grid point
        self.ended: set[str] = set()  # screening trials Tune has completed (finalist, stopped or errored)
        self.queue: list[dict[str, Any]] = []  # fold runs of finalists, not yet handed out, the costliest first
        self.cost: dict[str, float] = {}  # finalist -> its device hours per epoch

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        i = self.order.next()
        if i is not None:
            self.index[trial_id] = i
            return {"cfg": self.points[i]}
        if self.queue:
            return {"cfg": self.queue.pop(0)}
        if len(self.ended) < len(self.index):
            return None  # screening still runs: a finalist may come
        return Searcher.FINISHED  # type: ignore[return-value]  # Tune's documented "no more trials"

    def _observe(self, trial_id: str, value: Any) -> None:
        i = self.index.get(trial_id)
        if i is None or i in self.order.scores:
            return
        score = float(value) if isinstance(value, int | float) else math.nan
        self.order.observe(i, score if self.mode == "max" else -score)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if int(result.get("epoch", 0)) == self.first_rung:
            self._observe(trial_id, result.get(self.metric))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.index or trial_id in self.ended:
            return  # a fold run, or told twice
        # A trial that ends before the first rung errored (or the top rung is below it): the lowest rank.
        self._observe(trial_id, None if error or not result else result.get(self.metric))
        self.ended.add(trial_id)
        if not error and result and self.top is not None and int(result.get("epoch", 0)) >= self.top:
            point = self.points[self.index[trial_id]]
            self.cost[trial_id] = per_epoch_hours(result)
            self.queue += [
                {**point, "val_fold": k, "epochs": self.top, "_finalist": trial_id, EPOCH_HOURS: self.cost[trial_id]}
                for k in self.folds
            ]
            costs = [self.cost.get(str(q["_finalist"]), math.nan) for q in self.queue]
            self.queue = [self.queue[i] for i in longest_first(costs)]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self.__dict__.setdefault("cost", {})  # saved before fold runs were ordered by cost


def per_epoch_hours(result: Mapping[str, Any]) -> float:
    """A trial's device hours per epoch from its last result (the wall-clock a run of it holds a worker for;
    GPU-hours where a result has no device hours); NaN if unknown."""
    epochs = float(result.get("epoch", 0) or 0)
    hours = float(result.get("device_hours") or result.get("gpu_hours") or math.nan)
    return hours / epochs if epochs > 0 else math.nan


@contextmanager
def pending_trials(n: int | None) -> Iterator[None]:
    """Let Ray Tune keep ``n`` suggested trials pending while a searcher runs (Tune's default for a searcher is
    one, which would show the autoscaler one wanted worker at a time). An explicit TUNE_MAX_PENDING_TRIALS_PG in
    the environment wins; None changes nothing."""
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if n is None or key in os.environ:
        yield
        return
    os.environ[key] = str(n)
    try:
        yield
    finally:
        del os.environ[key]


_PIDS: dict[str, str] = {}  # Tune trial id -> promoter name (a drawn config is rebuilt to find it: keep it)


def is_fold_run(pid: str) -> bool:
    """A finalist's run on another fold ("<trial>/fold<k>"), not a screening trial."""
    return "/fold" in pid


EPOCH_HOURS = "_epoch_hours"  # in a fold run's config: its finalist's device hours per epoch when screened


def fold_costs(folds: list[Trial], fallback: Callable[[str], float] | None = None) -> dict[str, float]:
    """Each fold run's hours per epoch (by Tune trial id): the mean of what the screening runs of its
    architecture's finalists took (``_epoch_hours`` in each fold run's config). By architecture (encoder and
    decoder), so that runs of one architecture cost the same and never pre-empt each other on measurement noise;
    ``fallback(finalist)`` where no fold run's config carries the figure (a sweep whose fold runs were handed out
    before configs carried it; all or none, as its figure is in other units); NaN where none is known."""
    configs = {t.trial_id: resolve_config(t.config or {}) for t in folds}
    carried = any(EPOCH_HOURS in cfg for cfg in configs.values())
    by_arch: dict[tuple[str, str], list[float]] = {}
    arch = {}
    for i, cfg in configs.items():
        model = cfg.get("model") or {}
        arch[i] = (str(model.get("encoder")), str(model.get("decoder")))
        if carried or fallback is None:
            hours = float(cfg.get(EPOCH_HOURS, math.nan))
        else:
            hours = fallback(str(cfg.get("_finalist", "")))
        if hours == hours:
            by_arch.setdefault(arch[i], []).append(hours)
    mean = {a: sum(v) / len(v) for a, v in by_arch.items()}
    return {i: mean.get(a, math.nan) for i, a in arch.items()}


def _hours_left(trial: Trial, cost: float, epoch: int | None = None) -> float:
    """A fold run's hours to its last epoch, from ``epoch`` (default: the last it reported)."""
    if epoch is None:
        epoch = int((trial.last_result or {}).get("epoch", 0) or 0)
    return (int(resolve_config(trial.config or {}).get("epochs", 0)) - epoch) * cost


def _pid(trial: Trial) -> str:
    """The promoter's name for a Tune trial."""
    if trial.trial_id not in _PIDS:
        _PIDS[trial.trial_id] = trial_key(trial.trial_id, resolve_config(trial.config or {}))[0]
    return _PIDS[trial.trial_id]


@dataclasses.dataclass
class Restoring:
    """What the driver whose Tuner is being built and run gives the scheduler and callbacks that Tune restores from
    the pickle an earlier driver left (maybe on another head, in another directory): its own files, MLflow client
    and results table, in place of the pickled ones. The callbacks restored are listed, for the driver to flush."""

    files: SweepFiles
    tracker: Tracker | None = None
    table: SweepTable | None = None
    preempt_folds: bool | None = None  # the config's preempt_fold_runs (None: as pickled)
    callbacks: list[MlflowCallback] = dataclasses.field(default_factory=list)


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


def _room_for_one_more(trials: list[Trial], like: Trial, leaving: Collection[str] = ()) -> bool:
    """Whether the cluster's nodes have room for one more trial like ``like`` beside the running ones (those in
    ``leaving``, asked to pause, not counted): a waiting trial is then starting on a free worker, not waiting for
    one. Only nodes that have joined count: one the autoscaler is still starting does not (see PREEMPT_AFTER_S)."""

    def needs(t: Trial) -> dict[str, float]:
        return dict(t.placement_group_factory.required_resources) if t.placement_group_factory else {}

    free = dict(ray.cluster_resources())
    for t in trials:
        if t.status == Trial.RUNNING and t.trial_id not in leaving:
            for k, v in needs(t).items():
                free[k] = free.get(k, 0.0) - v
    return all(free.get(k, 0.0) >= v for k, v in needs(like).items() if v > 0)


WAITING = (Trial.PENDING, Trial.PAUSED)  # a trial waiting for a worker (PAUSED: until the scheduler starts it)

# A fold run must have waited this long for a worker before it pre-empts one: longer than a cloud node takes to
# start and join, so that a run waiting for a node the autoscaler is bringing up takes nobody's worker.
PREEMPT_AFTER_S = 900.0


class PromoterScheduler(FIFOScheduler):
    """A Ray Tune scheduler that asks a :class:`Promoter`: CONTINUE, PAUSE (checkpointed) or STOP (a finalist).

    Paused trials the promoter promotes go first, resumed by Tune from their last checkpoints; then new trials;
    then finalists' fold runs (``search: guided`` hands them out during screening), the one with the most hours
    left first. When nothing runs or waits, the rungs are closed and whatever can never be promoted is stopped,
    so the sweep ends.

    With ``preempt_folds``, a running fold run pauses at an epoch's end when the waiting fold run with the most
    hours left (the one this scheduler starts next) is of a costlier architecture, has more than ``PREEMPT_RATIO``
    times its hours left (:func:`~geopose_ray.sweep.order.pre_empts`), has waited ``preempt_after_s`` for a
    worker, and would get the one freed: no screening trial waits for a worker (screening goes first), no worker is
    free and no other fold run is already pausing. The costly run starts on its worker; the paused run resumes from
    its checkpoint when a worker is free, no epoch lost. This keeps a costly finalist that arrives late in screening
    from waiting behind cheaper fold runs while the rest of the pool runs dry (BENCHMARKS.md: fold runs).
    """

    def __init__(
        self,
        promoter: Promoter,
        metric: str = "score",
        files: SweepFiles | None = None,
        preempt_folds: bool = True,
        preempt_after_s: float = PREEMPT_AFTER_S,
    ) -> None:
        super().__init__()
        self.promoter = promoter
        self.preempt_folds = preempt_folds
        self.preempt_after_s = preempt_after_s
        self._waiting_since: dict[str, float] = {}  # fold run -> when it was first seen waiting for a worker
        self._leaving: set[str] = set()  # fold runs asked to pause, not yet resumed
        self._score_key = metric
        self._resume: list[str] = []  # promoted, not yet running again
        self.files = files  # where the promoter's state is rewritten after every change (Tune keeps none)

    def _save(self) -> None:
        if self.files is not None:
            state = {"promoter": self.promoter.to_dict(), "resume": self._resume}
            self.files.write(PROMOTER, json.dumps(state), required=False)

    def __getstate__(self) -> dict[str, Any]:
        # Where the files are is the running driver's business (its working directory), not the pickle's.
        return {**self.__dict__, "files": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the sweep started; the saved state is newer. The
        # driver restoring it has brought its own working copies up to date and attached them
        # (:func:`restoring_into`). The promoter is updated in place: the MLflow callback holds the same object.
        self.__dict__.update(state)
        self.__dict__.setdefault("preempt_after_s", PREEMPT_AFTER_S)  # pickled before fold runs could be pre-empted
        self._waiting_since, self._leaving = {}, set()  # the waits start again; nobody is pausing any more
        self.files = _RESTORING[-1].files if _RESTORING else None
        # The config the driver runs with now, not the one pickled when the sweep started.
        if _RESTORING and _RESTORING[-1].preempt_folds is not None:
            self.preempt_folds = _RESTORING[-1].preempt_folds
        self.__dict__.setdefault("preempt_folds", True)
        text = self.files.working_copy(PROMOTER) if self.files is not None else None
        if text is not None:
            saved = json.loads(text)
            self.promoter.__dict__.update(Promoter.from_dict(saved["promoter"]).__dict__)
            self._resume = list(saved["resume"])

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        # Tune starts every PENDING trial by itself; the scheduler only picks which goes first. A trial that
        # waits at a rung (restored after a driver restart, or brought back by a reopened sweep) must therefore
        # enter as PAUSED, so that only a promotion (choose_trial_to_run) starts it. Tune files the trial under
        # its status right after this call. (Trial.set_status and init_local_path are Trial's own methods.)
        pid = _pid(trial)
        if is_fold_run(pid):
            return
        if trial.status == Trial.PENDING and pid in self.promoter.paused and pid not in self._resume:
            trial.init_local_path()  # a trial that never runs still needs its directory for Tune's results
            trial.set_status(Trial.PAUSED)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if is_fold_run(_pid(trial)):  # a finalist's fold run trains to the top rung; the promoter never sees it
            return TrialScheduler.PAUSE if self._yields(tune_controller, trial, result) else TrialScheduler.CONTINUE
        value = result.get(self._score_key, math.nan)
        had_budget = self.promoter.budget_left
        decision = self.promoter.on_result(
            _pid(trial), int(result["epoch"]), float(value), float(result.get("gpu_hours", 0.0))
        )
        if had_budget and not self.promoter.budget_left:
            log.warning(
                "budget_gpu_hours %g is spent (%.3f GPU-hours): nothing more is promoted; trials that have not "
                "reached the first rung still train to it (the budget stops promotions, not the grid)",
                self.promoter.budget_gpu_hours, self.promoter.spent_gpu_hours,
            )  # fmt: skip
        self._save()
        if decision is Decision.CONTINUE:
            return TrialScheduler.CONTINUE
        if decision is Decision.FINALIST:
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = tune_controller.get_trials()
        by_pid = {_pid(t): t for t in trials if not is_fold_run(_pid(t))}
        folds = [t for t in trials if is_fold_run(_pid(t)) and t.status in WAITING]
        # After a driver restart Tune may bring a paused trial back as PENDING: it still waits for promotion.
        waiting = {
            pid: t
            for pid, t in by_pid.items()
            if t.status == Trial.PAUSED
            or (t.status == Trial.PENDING and pid in self.promoter.paused and pid not in self._resume)
        }
        changed = False
        # Promotions first, as asynchronous successive halving has it: a trial that qualifies now goes on before
        # a new trial starts, so the best configurations reach the top rung early.
        for pid in self.promoter.promotable():
            if pid in waiting:
                self.promoter.promote(pid)
                self._resume.append(pid)
                changed = True
        while self._resume:
            trial = by_pid.get(self._resume.pop(0))
            changed = True
            if trial is not None and trial.status in (Trial.PAUSED, Trial.PENDING):
                self._save()
                return trial
        if changed:
            self._save()
        new = [t for pid, t in by_pid.items() if t.status == Trial.PENDING and pid not in waiting]
        if new:
            return new[0]
        every_fold = [t for t in trials if is_fold_run(_pid(t))]
        self._note(every_fold)
        folds = self._most_hours_left(folds, fold_costs(every_fold, self._screened_cost))
        if folds:
            self._leaving.discard(folds[0].trial_id)  # resumed, if it was paused
        if any(t.status == Trial.RUNNING for t in by_pid.values()):
            # Screening goes on; a worker it leaves free takes a finalist's fold run, if one waits.
            return folds[0] if folds else None
        # No screening trial runs and none is new: close the rungs, then end whatever can never be promoted.
        chosen = [pid for pid in self.promoter.close() if pid in waiting]
        self._resume += chosen[1:]
        self._save()
        if chosen:
            return waiting[chosen[0]]
        for trial in waiting.values():
            tune_controller.stop_trial(trial)
        return folds[0] if folds else None

    @staticmethod
    def _most_hours_left(folds: list[Trial], cost: dict[str, float]) -> list[Trial]:
        """Waiting fold runs, the one with the most hours left first (``cost``: :func:`fold_costs` of every fold
        run): of those not started, the costliest architecture's first (they all train to the top rung), since a
        long run started last would hold the sweep's end back (BENCHMARKS.md: fold runs); a pre-empted run by what
        it has left. Unknown costs go last."""
        return [folds[i] for i in longest_first([_hours_left(t, cost[t.trial_id]) for t in folds])]

    def _screened_cost(self, finalist: str) -> float:
        """A finalist's GPU-hours per epoch as the promoter recorded them (NaN if unknown or none)."""
        reached, hours = self.promoter.reached(finalist), self.promoter.gpu_hours.get(finalist)
        return hours / self.promoter.rungs[reached - 1] if hours and reached else math.nan

    def _screening_waits(self, trials: list[Trial]) -> bool:
        """Whether a screening trial waits for a worker: it would take one a pre-empted fold run frees."""
        if self._resume:
            return True
        held = {pid for t in trials if not is_fold_run(pid := _pid(t)) and t.status in (Trial.PAUSED, Trial.PENDING)}
        if set(self.promoter.promotable()) & held:
            return True
        return any(t.status == Trial.PENDING and pid not in self.promoter.paused
                   for t in trials if not is_fold_run(pid := _pid(t)))  # fmt: skip

    def _yields(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> bool:
        """Whether a running fold run, at the end of the epoch it reported, gives up its worker to a waiting one
        (:func:`~geopose_ray.sweep.order.pre_empts`, and the conditions in the class's docstring)."""
        if not self.preempt_folds or result.get("replayed"):
            return False
        self._leaving.discard(trial.trial_id)  # it reports a result: it is running, not pausing
        trials = tune_controller.get_trials()
        folds = [t for t in trials if is_fold_run(_pid(t))]
        self._note(folds)
        cost = fold_costs(folds, self._screened_cost)
        # The run the freed worker would go to (choose_trial_to_run's pick), and only it, must justify the pause.
        waiting = self._most_hours_left([t for t in folds if t is not trial and t.status in WAITING], cost)
        if not waiting or time.time() - self._waiting_since[waiting[0].trial_id] < self.preempt_after_s:
            return False
        head = waiting[0].trial_id
        left = _hours_left(trial, cost[trial.trial_id], int(result.get("epoch", 0)))
        if (
            left <= 0
            or not pre_empts(cost[trial.trial_id], left, [(cost[head], _hours_left(waiting[0], cost[head]))])
            or _room_for_one_more(trials, trial, self._leaving)
            or self._screening_waits(trials)
        ):
            return False
        log.info("fold run %s yields its worker at epoch %s (%.3g hours left) to %s",
                 _pid(trial), result.get("epoch"), left, _pid(waiting[0]))  # fmt: skip
        self._leaving.add(trial.trial_id)
        return True

    def _note(self, folds: list[Trial]) -> None:
        """Keep when each waiting fold run began to wait, and which runs asked to pause have not yet resumed,
        ended or been requeued (only a RUNNING run is still pausing; a PAUSED one holds no worker)."""
        now = time.time()
        for t in folds:
            if t.status in WAITING:
                self._waiting_since.setdefault(t.trial_id, now)
            else:
                self._waiting_since.pop(t.trial_id, None)
            if t.status not in (Trial.RUNNING, Trial.PAUSED):
                self._leaving.discard(t.trial_id)

    def debug_string(self) -> str:
        p = self.promoter
        sizes = [len(p.results[i]) for i in range(len(p.rungs))]
        return (
            f"Promoter: rungs {p.rungs}, results per rung {sizes}, paused {len(p.paused)}, finalists {len(p.finalists)}"
        )


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one TrainConfig, reporting every epoch with a checkpoint and
    resuming from Tune's checkpoint when the trial is resumed or restarted."""
    raw = resolve_config(config)
    torch.set_num_threads(max(1, int(raw.get("_threads", 1))))
    gpus = float(raw.get("_gpus", 0.0))  # GPUs the trial holds: what a bill (and the budget) counts
    _, config = trial_key("", raw)
    cfg = TrainConfig.from_dict(config)
    work = _work_dir()
    checkpoint = tune.get_checkpoint()
    unregistered: list[tuple[Path, int]] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copy(Path(d) / LAST, work / LAST)
        unregistered = _unregistered(checkpoint)
    elif raw.get("_resume_from"):  # continued in a reopened sweep: from its last checkpoint there
        copy_file(join(raw["_resume_from"], LAST), work / LAST)

    trainers: list[Trainer] = []  # the one running (a second after an out-of-memory retry)

    delay = _injected_delay(raw, cfg)

    def report(metrics: dict[str, float], last: Path) -> None:
        time.sleep(delay)
        # Every epoch's hours so far, those before a restart included (the checkpoint keeps the history).
        seconds = sum(h.get("train_s", 0.0) + h.get("val_s", 0.0) for h in trainers[-1].history)
        out = dict(metrics)
        out["gpu_hours"] = seconds / 3600.0 * gpus
        out["device_hours"] = seconds / 3600.0
        # Kept with the checkpoint, so that a restore from an older one can report this epoch again (_replay).
        atomic_write_text(last.parent / REPORTED, json.dumps(out))
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(last.parent)))

    retried: dict[str, float] = {}

    def report_with_retry(metrics: dict[str, float], last: Path) -> None:
        report({**metrics, **retried}, last)

    try:
        _replay(unregistered, work)
        try:
            _fit(cfg, work, report_with_retry, raw, trainers)
        except torch.OutOfMemoryError:
            if cfg.batch_size < 2:
                raise
            # Out of memory: once more with half the micro-batch and twice the accumulation (the same effective
            # batch for an even batch size), from the last checkpoint if an epoch was completed.
            smaller = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2, accumulation=cfg.accumulation * 2)
            log.warning("trial ran out of memory at batch %d; retrying at %d x %d", cfg.batch_size,
                        smaller.batch_size, smaller.accumulation)  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            retried.update(oom_retry=1.0, batch_size=smaller.batch_size, accumulation=smaller.accumulation)
            _fit(smaller, work, report_with_retry, raw, trainers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


WORK_PREFIX = "geopose-trial-"  # a trial's scratch directory in the node's temp dir: <prefix><host>.<pid>-<random>


def _work_dir(root: Path | None = None) -> Path:
    """A new scratch directory for the trial this process starts, after removing those that earlier trials left.

    A trial removes its own when it ends, but one that Tune pauses or stops may not get to (its actor ends while
    the training thread still waits in ``tune.report``), and a killed worker never does: each leftover holds the
    trial's last.pt and best.pt. Those of this host (a temp dir shared by containers holds others' too) left by a
    process that is gone, or by this one (Tune reuses the process for the next trial only once the last one's
    thread has ended), are removed; those of live processes, other hosts and unknown owners are kept."""
    root = Path(tempfile.gettempdir()) if root is None else root
    host = socket.gethostname().replace("/", "_")
    for d in root.glob(f"{WORK_PREFIX}*"):
        owner_host, _, pid = d.name[len(WORK_PREFIX) :].rpartition("-")[0].rpartition(".")
        if owner_host == host and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{host}.{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


class KillAfterResult(Callback):
    """Fault injection (tests): ``faults: {kill_after_result: E}`` SIGKILLs a screening trial's worker process as
    soon as the driver has processed its epoch-E result, before Tune registers that epoch's checkpoint: the
    moment at which losing a pre-empted node costs the most. Once per trial; a single-machine cluster only (the
    result's pid is a local process)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.done: set[str] = set()

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        if int(result.get("epoch", 0)) != self.epoch or result.get("replayed") or is_fold_run(_pid(trial)):
            return
        if trial.trial_id not in self.done:
            self.done.add(trial.trial_id)
            os.kill(int(result["pid"]), signal.SIGKILL)


def _injected_delay(raw: dict[str, Any], cfg: TrainConfig) -> float:
    """Fault injection (tests): ``faults: {slow: {lr, accumulation, seconds}}`` makes that screening trial's every
    epoch take ``seconds`` longer (its fold runs too with ``folds: true``)."""
    slow = raw.get("_faults", {}).get("slow")
    if not slow or (raw.get("_finalist") and not slow.get("folds")):
        return 0.0
    matches = math.isclose(cfg.lr, float(slow["lr"])) and cfg.accumulation == int(slow["accumulation"])
    return float(slow["seconds"]) if matches else 0.0


def _fit(cfg: TrainConfig, work: Path, on_epoch: Any, raw: dict[str, Any], trainers: list[Trainer]) -> None:
    trainers.append(Trainer(cfg, work, on_epoch=on_epoch))
    limit = raw.get("_faults", {}).get("oom_above_batch")
    if limit is not None and cfg.batch_size > int(limit):  # fault injection (tests): as a too-large batch does
        raise torch.OutOfMemoryError(f"simulated: batch {cfg.batch_size} > {limit} does not fit")
    trainers[-1].fit()


class SweepTable:
    """The sweep's results table as it stands: a row per trial (screening and fold runs) and each trial's
    curve. While the sweep runs it is rewritten (``results.csv`` and the parent run's artifacts: the table and
    a plot of every screening curve with the finalists bold) at most every ``refresh_s`` seconds, as trials
    pause, finish or fail (a change that comes sooner is written once ``refresh_s`` has passed, at the next
    step of Tune's loop); the driver writes it once more at the end."""

    _behind = False  # a change not yet written, as it came within refresh_s of the last write (also if unpickled)

    def __init__(self, files: SweepFiles, rungs: list[int], title: str = "", refresh_s: float = 30.0) -> None:
        self.files = files  # the table is written there as results.csv
        self.rungs = rungs
        self.title = title
        self.refresh_s = refresh_s
        self.rows: dict[str, dict[str, Any]] = {}  # trial key -> row
        self.curves: dict[str, list[tuple[int, float]]] = {}  # trial key -> (epoch, score)
        self.finalists: list[str] = []
        self._written = -math.inf

    @property
    def path(self) -> Path:
        """The local file (the working copy, for a remote home): MLflow's artifact is uploaded from it."""
        return self.files.local / RESULTS

    def write(self, tracker: Tracker, force: bool = False) -> None:
        """Write the table now, or, within ``refresh_s`` of the last write, at the first :meth:`catch_up` after."""
        now = time.monotonic()
        if not force and now - self._written < self.refresh_s:
            self._behind = True
            return
        self._written, self._behind = now, False
        self.files.write(RESULTS, rows_csv(list(self.rows.values())), required=force)
        screen = {k: v for k, v in self.curves.items() if self.rows.get(k, {}).get("stage") == "screen"}
        try:
            parent = tracker.parent()
            tracker.artifact(parent, self.path)
            log_curves_plot(
                tracker, parent, screen, "screen_curves.png", rungs=self.rungs, highlight=self.finalists,
                title=f"{self.title}: screening (finalists bold)",
            )  # fmt: skip
        except Exception as e:  # the table on disk is current; MLflow gets it at the next refresh
            log.warning("MLflow unavailable (%s); the results table is at %s", e, self.path)

    def catch_up(self, tracker: Tracker) -> None:
        """Write a change that came too soon after the last write, once ``refresh_s`` has passed."""
        if self._behind:
            self.write(tracker)


class MlflowCallback(Callback):
    """Logs every trial to MLflow from the driver: a child run per trial under the sweep's parent run,
    metrics each epoch in one batch, and tags (stage, rung, status) that follow the promoter's decisions;
    keeps the sweep's :class:`SweepTable` current.

    What cannot be sent while the server is down (a trial's run not yet created, its epochs, its tags, its end)
    is kept per trial and sent, in order and once, at the next result of any trial or at :meth:`flush`.
    """

    def __init__(self, tracker: Tracker, promoter: Promoter | None, stage: str, table: SweepTable) -> None:
        self.tracker = tracker
        self.promoter = promoter
        self.stage = stage
        self.table = table
        self._waiting: dict[str, list[tuple[dict[str, float], int]]] = {}  # epochs not yet sent, per trial
        self._tags: dict[str, dict[str, Any]] = {}  # tags not yet sent
        self._end: dict[str, bool] = {}  # trial -> failed, for runs to end once their data is sent
        self._cfgs: dict[str, dict[str, Any]] = {}
        self._last: dict[str, dict[str, Any]] = {}  # trial key -> its last result

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Restored by Tune from an earlier driver's pickle: log through this driver's client into its table.
        self.__dict__.update(state)
        if _RESTORING:
            driver = _RESTORING[-1]
            self.tracker = driver.tracker if driver.tracker is not None else self.tracker
            self.table = driver.table if driver.table is not None else self.table
            driver.callbacks.append(self)

    def _key(self, trial: Trial) -> tuple[str, dict[str, Any]]:
        return trial_key(trial.trial_id, resolve_config(trial.config or {}))

    def _stage(self, key: str) -> str:
        """The callback's stage, except for a finalist's fold run started during screening (backfilled)."""
        return "fold" if is_fold_run(key) else self.stage

    def _status(self, trial: Trial) -> dict[str, Any]:
        p = self.promoter
        if p is None or is_fold_run(_pid(trial)):
            return {"status": "running"}
        return {"status": p.status(_pid(trial)), "rung": p.reached(_pid(trial))}

    def _row(self, key: str, cfg: dict[str, Any], status: dict[str, Any]) -> None:
        self.table.rows[key] = result_row(
            key, self._stage(key), status["status"], status.get("rung", ""), cfg, self._last.get(key, {})
        )
        if self.promoter is not None:
            self.table.finalists = list(self.promoter.finalists)

    def _deliver(self, key: str) -> bool:
        """Send what is pending for one trial; False while the server is down."""
        run = self.tracker.trial(key, self._cfgs[key], self._stage(key))
        if run is None:
            return False
        waiting = self._waiting.get(key, [])
        for metrics, step in waiting:
            self.tracker.metrics(run, metrics, step)
        waiting.clear()
        if self._tags.get(key):
            self.tracker.tags(run, self._tags.pop(key))
        if key in self._end:
            self._plot(run, key)
            self.tracker.finish(run, failed=self._end.pop(key))
        return True

    @property
    def pending(self) -> bool:
        """Something is kept back for a server that was down."""
        return any(self._waiting.values()) or any(self._tags.values()) or bool(self._end)

    def flush(self) -> None:
        """Send whatever is pending for every trial (stops at the first trial the server does not take)."""
        for key in list(self._cfgs):
            if (self._waiting.get(key) or self._tags.get(key) or key in self._end) and not self._deliver(key):
                return

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        key, cfg = self._key(trial)
        self._cfgs[key] = cfg
        numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        numbers.pop("replayed", None)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        # An epoch reported again after a restore (train_trial's _replay) is logged once: it was not trained again.
        if not (result.get("replayed") and any(e == epoch for e, _ in self.table.curves.get(key, []))):
            self._waiting.setdefault(key, []).append((numbers, epoch))
            if isinstance(result.get("score"), int | float):
                self.table.curves.setdefault(key, []).append((epoch, float(result["score"])))
        self._last[key] = numbers
        status = self._status(trial)
        before = self.table.rows.get(key, {}).get("status")
        self._row(key, cfg, status)
        if status["status"] in ("paused", "finalist") or status["status"] != before:  # paused, or running again
            self.table.write(self.tracker)
        tags = {**status, "stage": self._stage(key)}
        if result.get("oom_retry"):
            tags["oom_retry"] = f"out of memory: retried at batch {result['batch_size']} x {result['accumulation']}"
        self._tags[key] = {**self._tags.get(key, {}), **tags}
        if self._deliver(key):
            self.flush()  # the server answers: anything kept from an outage goes now

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        """A fold run the scheduler paused for a costlier one (pre-emption) shows as paused, in the table and its
        run's tags, until it reports again. Tune pauses it after the result that asked for the pause, so it is
        seen here, at the end of a step of Tune's loop."""
        paused = False
        for trial in trials:
            if trial.status != Trial.PAUSED or not is_fold_run(_pid(trial)):
                continue
            if self.table.rows.get(_pid(trial), {}).get("status") != "running":
                continue
            key, cfg = self._key(trial)
            self._cfgs[key] = cfg
            self._row(key, cfg, {"status": "paused"})
            self._tags[key] = {**self._tags.get(key, {}), "status": "paused"}
            self._deliver(key)
            paused = True
        if paused:
            self.table.write(self.tracker)
        else:
            self.table.catch_up(self.tracker)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        self._cfgs[key] = cfg
        status = self._status(trial)
        if status["status"] == "running":
            status["status"] = "done" if self._stage(key) == "fold" else "stopped"
        self._row(key, cfg, status)
        self.table.write(self.tracker)
        self._tags[key] = {**self._tags.get(key, {}), **status}
        self._end[key] = False
        self._deliver(key)

    def _plot(self, run: str, key: str) -> None:
        rungs = self.promoter.rungs if self.promoter is not None else ()
        log_curves_plot(
            self.tracker, run, {key: self.table.curves.get(key, [])}, "learning_curve.png", rungs=rungs, title=key
        )

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        self._cfgs[key] = cfg
        self._row(key, cfg, {"status": "errored"})
        self.table.write(self.tracker)
        self._tags[key] = {**self._tags.get(key, {}), "status": "errored", "error": _error_reason(trial)}
        self._end[key] = True
        self._deliver(key)


def log_curves_plot(
    tracker: Tracker, run: str, curves: dict[str, list[tuple[int, float]]], name: str, **kw: Any
) -> None:
    """Log a learning-curve plot as an artifact of ``run``; a plotting failure never stops a sweep."""
    try:
        with tempfile.TemporaryDirectory() as d:
            tracker.artifact(run, curves_plot(curves, Path(d) / name, **kw))
    except Exception:
        return


def _error_reason(trial: Trial) -> str:
    """The last line of a trial's error (its exception), for the run's ``error`` tag."""
    path = trial.error_file
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1][:500] if lines else "unknown error"

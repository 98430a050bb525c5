"""The Ray Tune scheduler that dispatches the promoter's decisions and the fold-run rules."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection
from typing import Any

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from geopose_ray.cluster.restore import _RESTORING
from geopose_ray.sweep.files import PROMOTER, SweepFiles
from geopose_ray.sweep.order import longest_first, pre_empts
from geopose_ray.sweep.promoter import Decision, Promoter
from geopose_ray.sweep.records import EPOCH_HOURS, is_fold_run, resolve_config, trial_key

log = logging.getLogger(__name__)


_PIDS: dict[str, str] = {}  # Tune trial id -> promoter name (a drawn config is rebuilt to find it: keep it)


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

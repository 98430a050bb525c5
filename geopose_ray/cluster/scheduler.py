"""The Ray Tune scheduler: a thin adapter that runs the sweep's dispatch policy (:mod:`geopose_ray.sweep.dispatch`)
on Tune's trials."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import replace
from typing import Any

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from geopose_ray.cluster.restore import _RESTORING
from geopose_ray.sweep.dispatch import PREEMPT_AFTER_S, Dispatch, Kind, State, TrialView
from geopose_ray.sweep.files import PROMOTER, SweepFiles
from geopose_ray.sweep.promoter import Decision, Promoter
from geopose_ray.sweep.records import EPOCH_HOURS, is_fold_run, resolve_config, trial_key

log = logging.getLogger(__name__)


_STATES = {Trial.PENDING: State.PENDING, Trial.PAUSED: State.PAUSED, Trial.RUNNING: State.RUNNING}

_CONFIGS: dict[str, TrialView] = {}  # Tune trial id -> what its config says (resolved once: a draw is rebuilt)


def _static(trial: Trial) -> TrialView:
    """What a Tune trial's config says of it (its key, stage, epochs, cost, architecture), read once."""
    static = _CONFIGS.get(trial.trial_id)
    if static is None:
        cfg = resolve_config(trial.config or {})
        key = trial_key(trial.trial_id, cfg)[0]
        model = cfg.get("model") or {}
        static = _CONFIGS[trial.trial_id] = TrialView(
            key=key,
            fold=is_fold_run(key),
            state=State.ENDED,
            epochs=int(cfg.get("epochs", 0) or 0),
            cost=float(cfg.get(EPOCH_HOURS, math.nan)),
            arch=f"{model.get('encoder')}/{model.get('decoder')}",
            finalist=str(cfg.get("_finalist", "")),
        )
    return static


def _pid(trial: Trial) -> str:
    """The trial key of a Tune trial (the promoter's name for it)."""
    return _static(trial).key


def view(trial: Trial, epoch: int | None = None) -> TrialView:
    """A Tune trial as the dispatch policy sees it; ``epoch``: the one it reports now (default: its last result's).
    A fold run's cost is its finalist's device hours per epoch, carried in its config (``_epoch_hours``)."""
    static = _static(trial)
    if epoch is None:
        epoch = int((trial.last_result or {}).get("epoch", 0) or 0)
    return replace(static, state=_STATES.get(trial.status, State.ENDED), epoch=epoch)


def free_workers(trials: list[Trial], like: Trial) -> int:
    """How many more trials like ``like`` the cluster's nodes have room for beside the running ones. Only nodes
    that have joined count: one the autoscaler is still starting does not (hence the dispatch's wait before a
    pre-emption)."""

    def needs(t: Trial) -> dict[str, float]:
        return dict(t.placement_group_factory.required_resources) if t.placement_group_factory else {}

    free = dict(ray.cluster_resources())
    for t in trials:
        if t.status == Trial.RUNNING:
            for k, v in needs(t).items():
                free[k] = free.get(k, 0.0) - v
    want = {k: v for k, v in needs(like).items() if v > 0}
    if not want:
        return sys.maxsize  # a trial that needs nothing always fits
    return max(0, min(int(free.get(k, 0.0) // v) for k, v in want.items()))


class PromoterScheduler(FIFOScheduler):
    """A Ray Tune scheduler that runs the sweep's :class:`~geopose_ray.sweep.dispatch.Dispatch`: it turns Tune's
    trials into :class:`~geopose_ray.sweep.dispatch.TrialView` values, the cluster's free resources into free
    workers, and the policy's answers into Tune's: CONTINUE, PAUSE (checkpointed: at a rung, or a fold run
    yielding its worker), STOP (a finalist, or a trial that can never be promoted), and the trial to run next.
    The policy's state is rewritten to ``promoter.json`` after every change (Tune keeps none of it).
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
        self.dispatch = Dispatch(promoter, preempt_folds, preempt_after_s)
        self._score_key = metric
        self.files = files  # where the policy's state is rewritten after every change
        self._saved: str | None = None  # what was written last: an unchanged state is not written again

    @property
    def promoter(self) -> Promoter:
        return self.dispatch.promoter

    @property
    def preempt_folds(self) -> bool:
        return self.dispatch.preempt

    def _save(self) -> None:
        if self.files is not None:
            text = json.dumps(self.dispatch.to_dict())
            if text != self._saved:
                self.files.write(PROMOTER, text, required=False)
                self._saved = text

    def __getstate__(self) -> dict[str, Any]:
        # Where the files are is the running driver's business (its working directory), not the pickle's.
        return {**self.__dict__, "files": None, "_saved": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the sweep started; the saved state is newer. The
        # driver restoring it has brought its own working copies up to date and attached them
        # (:func:`restoring_into`). The promoter is updated in place: the MLflow callback holds the same object.
        if "dispatch" not in state:  # pickled by a version that kept the policy's state on the scheduler itself
            policy = ("promoter", "preempt_folds", "preempt_after_s", "_resume", "_waiting_since", "_leaving")
            state = {k: v for k, v in state.items() if k not in policy} | {
                "dispatch": Dispatch(
                    state["promoter"], state.get("preempt_folds", True), state.get("preempt_after_s", PREEMPT_AFTER_S),
                    list(state.get("_resume", [])),
                )
            }  # fmt: skip
        self.__dict__.update(state)
        self._saved = None  # the file this driver finds is not known to hold this state
        self.files = _RESTORING[-1].files if _RESTORING else None
        if _RESTORING and _RESTORING[-1].preempt_folds is not None:  # the config the driver runs with now
            self.dispatch.preempt = _RESTORING[-1].preempt_folds
        text = self.files.working_copy(PROMOTER) if self.files is not None else None
        if text is not None:
            self.dispatch.load(json.loads(text))
        else:
            self.dispatch.leaving, self.dispatch.waiting_since, self.dispatch.stopped = set(), {}, set()

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        # Tune starts every PENDING trial by itself; the scheduler only picks which goes first. A trial that
        # waits at a rung (restored after a driver restart, or brought back by a reopened sweep) must therefore
        # enter as PAUSED, so that only a promotion (choose_trial_to_run) starts it. Tune files the trial under
        # its status right after this call. (Trial.set_status and init_local_path are Trial's own methods.)
        # A new trial the budget does not afford now waits the same way, until the dispatch policy starts it (a
        # rung's share freed up) or the sweep's end stops it.
        pid = _pid(trial)
        if is_fold_run(pid) or trial.status != Trial.PENDING:
            return
        if self.dispatch.enters_paused(pid) or self._beyond_budget(tune_controller.get_trials(), [view(trial)]):
            trial.init_local_path()  # a trial that never runs still needs its directory for Tune's results
            trial.set_status(Trial.PAUSED)

    def _beyond_budget(self, trials: list[Trial], candidates: list[TrialView], for_good: bool = False) -> set[str]:
        """Of ``candidates``, the keys of those the budget does not let start now, or (``for_good``) ever
        (:meth:`Dispatch.beyond_budget`)."""
        if self.promoter.budget_gpu_hours is None:
            return set()
        views = [view(t) for t in trials]
        known = {v.key for v in views}
        everyone = [*views, *(c for c in candidates if c.key not in known)]
        return set(self.dispatch.beyond_budget(everyone, for_good)) & {c.key for c in candidates}

    def _stop_unstarted(self, tune_controller: Any, trials: list[Trial], keys: set[str]) -> None:
        """Stop the never-started trials named by ``keys``, keeping their configs for a reopened sweep."""
        for t in trials:
            key = _pid(t)
            if key in keys and t.status in (Trial.PENDING, Trial.PAUSED):
                self.dispatch.unstarted[key] = trial_key(t.trial_id, resolve_config(t.config or {}))[1]
                self.dispatch.stopped.add(key)
                tune_controller.stop_trial(t)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        me = view(trial, int(result.get("epoch", 0) or 0))
        if me.fold:
            if result.get("replayed") or not self.dispatch.preempt:  # replayed: an epoch taken up, not trained now
                return TrialScheduler.CONTINUE
            trials = tune_controller.get_trials()
            others = [me if t is trial else view(t) for t in trials]
            decision = self.dispatch.on_result(me, math.nan, 0.0, others, free_workers(trials, trial), time.time())
            if decision is Decision.YIELD:
                log.info("fold run %s yields its worker at epoch %s", me.key, me.epoch)
                return TrialScheduler.PAUSE
            return TrialScheduler.CONTINUE
        had_budget = self.promoter.budget_left
        others = [me if t is trial else view(t) for t in tune_controller.get_trials()]
        decision = self.dispatch.on_result(
            me, float(result.get(self._score_key, math.nan)), float(result.get("gpu_hours", 0.0)), others
        )
        if had_budget and not self.promoter.budget_left:
            log.warning(
                "budget_gpu_hours %g is spent (%.3f GPU-hours): no screening trial starts or is promoted any more; "
                "those running finish their rung, and a reopened sweep with a larger budget continues the rest",
                self.promoter.budget_gpu_hours, self.promoter.spent_gpu_hours,
            )  # fmt: skip
        # Ray Tune starts its queued trials by itself: once the whole budget cannot afford another first rung, the
        # never-started ones are stopped now (kept for a reopened sweep). While only a rung's share holds a start
        # back, a trial Tune has already queued may still start (new ones enter paused: on_trial_add).
        trials = tune_controller.get_trials()
        self._stop_unstarted(tune_controller, trials, self._beyond_budget(trials, [view(t) for t in trials], True))
        self._save()
        if decision is Decision.CONTINUE:
            return TrialScheduler.CONTINUE
        if decision is Decision.FINALIST:
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """The policy's pick for the next worker to free. Tune stages it at once (as it stages its other pending
        trials, which is what an autoscaler sees) and gives it the worker a paused or finished trial's cached actor
        frees first."""
        trials = tune_controller.get_trials()
        by_key = {_pid(t): t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)}  # the pick waits
        while True:
            views = [view(t) for t in trials]
            pick = self.dispatch.pick(views, 1, time.time())
            self._save()
            if pick.kind is not Kind.STOP:
                return by_key[pick.key] if pick.key is not None else None
            never = {v.key for v in views if v.key in pick.keys and self.dispatch.never_started(v)}
            self._stop_unstarted(tune_controller, trials, never)
            for key in set(pick.keys) - never:  # they can never be promoted: the sweep ends without them
                tune_controller.stop_trial(by_key[key])
            self._save()

    def debug_string(self) -> str:
        p = self.promoter
        sizes = [len(p.results[i]) for i in range(len(p.rungs))]
        return (
            f"Promoter: rungs {p.rungs}, results per rung {sizes}, paused {len(p.paused)}, finalists {len(p.finalists)}"
        )

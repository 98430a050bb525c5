"""The sweep's dispatch policy: which trial a free worker takes, and when a running fold run gives its worker up.

One pure object, :class:`Dispatch`, holds the whole policy: the :class:`~geopose_ray.sweep.promoter.Promoter`
(which screening trial continues, pauses or is a finalist), the queue of trials promoted but not yet running
again, and the rules for the finalists' fold runs (the one with the most hours left first; pre-emption by a
costlier one). It sees plain values only: a :class:`TrialView` per trial, the number of free workers and the
time. Two backends drive the same object: the Ray Tune scheduler (:mod:`geopose_ray.cluster.scheduler`) and the
simulator (:mod:`geopose_ray.simulate.engine`). No Ray, no torch, no files.

Trials are named by their key (a screening trial's id, ``<trial>/fold<k>`` for a finalist's fold run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from geopose_ray.sweep.order import longest_first, pre_empts
from geopose_ray.sweep.promoter import Decision, Promoter

# A fold run must have waited this long for a worker before it pre-empts one: longer than a cloud node takes to
# start and join, so that a run waiting for a node the autoscaler is bringing up takes nobody's worker.
PREEMPT_AFTER_S = 900.0


class State(StrEnum):
    """Where a trial is, as the backend sees it."""

    PENDING = "pending"  # created, holds no worker: never ran, or (after a driver restart) waits at a rung
    PAUSED = "paused"  # ran, holds no worker: waits at a rung, or a fold run that gave its worker up
    RUNNING = "running"  # holds a worker
    ENDED = "ended"  # finished, stopped or errored: never runs again


WAITING = (State.PENDING, State.PAUSED)  # holds no worker, may run again


@dataclass(frozen=True)
class TrialView:
    """One trial as the policy sees it.

    ``cost`` is hours per epoch on one worker, the same unit for every trial of a sweep (device hours per epoch
    on Ray, a curve's hours per epoch in the simulator); a fold run's is what its finalist took when screened,
    NaN if unknown. ``arch`` groups trials whose epochs cost the same (encoder and decoder): fold runs are
    costed by their architecture's mean, so that runs of one architecture never pre-empt each other.
    """

    key: str
    fold: bool  # a finalist's run on another fold (else a screening trial)
    state: State
    epoch: int = 0  # epochs trained (for a result being reported: the epoch it reports)
    epochs: int = 0  # epochs it trains to (a fold run: the top rung)
    cost: float = math.nan  # hours per epoch
    arch: str = ""
    finalist: str = ""  # a fold run's screening trial


class Kind(StrEnum):
    START = "start"  # a trial that never ran takes the free worker
    RESUME = "resume"  # a paused trial continues from its checkpoint on the free worker
    STOP = "stop"  # end these waiting trials (they can never be promoted), then ask again
    NOTHING = "nothing"  # nothing to run now


@dataclass(frozen=True)
class Pick:
    """The answer to "a worker is free": what to run, or which trials to end."""

    kind: Kind
    keys: tuple[str, ...] = ()

    @property
    def key(self) -> str | None:
        return self.keys[0] if self.keys and self.kind in (Kind.START, Kind.RESUME) else None


NOTHING = Pick(Kind.NOTHING)


@dataclass
class Dispatch:
    """The dispatch policy and its state.

    Rules, in order, when a worker is free (:meth:`pick`):

    1. Paused screening trials the promoter promotes resume first (from their checkpoints), in the promoter's
       order: as asynchronous successive halving has it, so the best reach the top rung early.
    2. Then a new screening trial starts (the oldest created), if the budget affords its first rung beside what
       the running screening trials still need to reach their next rungs (:meth:`committed`,
       :meth:`Promoter.affords`; its hours per epoch estimated by the mean of those that have reported), within
       the first rung's share of the budget (:meth:`Promoter.rung_shares`).
    3. Then the waiting fold run with the most hours left (:meth:`fold_order`).
    4. When no screening trial runs and none is new that the budget affords, the promoter's rungs are closed
       (:meth:`Promoter.close`) and what it promotes resumes; if it promotes nothing, the screening trials still
       waiting can never be promoted (or never be afforded) and are stopped (:data:`Kind.STOP`), so the sweep
       ends.

    With ``preempt``, a running fold run yields its worker at an epoch's end (:meth:`should_yield`) when the
    waiting fold run the worker would go to is of a costlier architecture with more than
    :data:`~geopose_ray.sweep.order.PREEMPT_RATIO` times its hours left, has waited ``preempt_after_s``, no worker
    is free, no other fold run is already yielding, and no screening trial waits for a worker.

    Args:
        promoter: the promotion rules and their state.
        preempt: whether fold runs may be pre-empted.
        preempt_after_s: seconds a fold run must have waited for a worker before it pre-empts one.
    """

    promoter: Promoter
    preempt: bool = True
    preempt_after_s: float = PREEMPT_AFTER_S
    resume: list[str] = field(default_factory=list)  # promoted, not yet running again (persisted)
    leaving: set[str] = field(default_factory=set)  # fold runs asked to yield, not yet paused or resumed
    waiting_since: dict[str, float] = field(default_factory=dict)  # fold run -> when it was first seen waiting
    stopped: set[str] = field(default_factory=set)  # screening trials this policy asked to stop
    # Grid points stopped before they ever started (beyond the budget), with their configs as the backend gave
    # them: recorded as stopped, and started by a reopened sweep with a larger budget (persisted).
    unstarted: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- results ----------------------------------------------------------------------------------------

    def on_result(
        self,
        trial: TrialView,
        value: float,
        gpu_hours: float,
        trials: Sequence[TrialView] = (),
        free_workers: int = 0,
        now: float = 0.0,
    ) -> Decision:
        """A running trial reported epoch ``trial.epoch`` with metric ``value`` (and ``gpu_hours`` so far).

        A screening trial gets the promoter's decision (CONTINUE, PAUSE, FINALIST); a fold run CONTINUE, or
        YIELD when it gives its worker up (:meth:`should_yield`; ``trials``, ``free_workers`` and ``now`` are for
        that rule).
        """
        if trial.fold:
            return Decision.YIELD if self.should_yield(trial, trials, free_workers, now) else Decision.CONTINUE
        committed = self.committed([t for t in trials if t.key != trial.key], self.resume)
        return self.promoter.on_result(trial.key, trial.epoch, value, gpu_hours, committed)

    def committed(self, trials: Iterable[TrialView], resuming: Iterable[str] = ()) -> list[float]:
        """The GPU-hours the running screening trials among ``trials`` (and ``resuming``: promoted, about to run
        again) still need to reach their next rungs, per rung index: the part of them at epochs up to that rung
        (cumulative; the last is the whole). Each at its own hours per epoch, or the mean; a trial whose cost
        nobody knows yet counts nothing."""
        p = self.promoter
        by_rung = [0.0] * len(p.rungs)
        views = {t.key: t for t in trials if not t.fold and t.key not in self.stopped}
        keys = [k for k, t in views.items() if t.state is State.RUNNING] + [k for k in resuming if k in views]
        for key in dict.fromkeys(keys):
            epoch, cost = views[key].epoch, p.epoch_cost(key)
            if cost != cost:
                continue
            target = p.next_rung(epoch)
            for i, r in enumerate(p.rungs):
                by_rung[i] += max(0, min(r, target) - epoch) * cost
        return by_rung

    def affords_start(self, committed: Sequence[float] | float) -> bool:
        """Whether the budget affords a new screening trial's first rung beside ``committed``, within the first
        rung's share (:meth:`Promoter.affords`)."""
        p = self.promoter
        return p.affords(p.rungs[0] * p.mean_epoch_cost, committed, 0)

    def beyond_budget(self, trials: Sequence[TrialView], for_good: bool = False) -> list[str]:
        """The screening trials among ``trials`` that never started and that the budget does not afford now
        (empty while it affords a start); ``for_good``: only once the whole budget cannot afford a first rung
        (a rung's share may free up as running trials pass the first rung; the whole budget does not). A backend
        that starts waiting trials by itself (Ray Tune) holds the first back and stops the second."""
        screen = [t for t in trials if not t.fold and t.key not in self.stopped]
        committed = self.committed(screen)
        p = self.promoter
        affordable = p.affords(p.rungs[0] * p.mean_epoch_cost, committed[-1]) if for_good else (
            self.affords_start(committed))  # fmt: skip
        if affordable:
            return []
        return [t.key for t in screen if self.never_started(t)]

    def never_started(self, t: TrialView) -> bool:
        """A screening trial that has not trained an epoch and does not wait at a rung."""
        return not t.fold and t.state in WAITING and t.epoch == 0 and t.key not in self.promoter.paused

    def enters_paused(self, key: str) -> bool:
        """Whether a screening trial that a backend creates (again) waits at a rung for a promotion rather than
        starting: one restored after a driver restart, or brought back by a reopened sweep."""
        return key in self.promoter.paused and key not in self.resume

    # -- a free worker ----------------------------------------------------------------------------------

    def pick(self, trials: Sequence[TrialView], free_workers: int = 1, now: float = 0.0) -> Pick:
        """What a free worker does (the rules in the class's docstring). ``trials``: every trial the backend has
        (ended ones may be left out), screening trials in the order they were created. ``free_workers`` (how many
        are free, at least the one asking) and ``now`` (seconds) are the backend's; the rules of a pick do not
        depend on the number free, and ``now`` starts the waits of the fold runs it sees waiting."""
        screen = [t for t in trials if not t.fold and t.key not in self.stopped]
        by_key = {t.key: t for t in screen}
        waiting = {t.key: t for t in screen if self._held(t)}
        for key in self.promoter.promotable(self.committed(screen, self.resume)):
            if key in waiting:
                self.promoter.promote(key)
                self.resume.append(key)
        while self.resume:
            t = by_key.get(self.resume.pop(0))
            if t is not None and t.state in WAITING:
                return Pick(Kind.RESUME, (t.key,))
        # Never started: pending, or held back (paused) by the budget before it ran.
        new = [t for t in screen if t.state in WAITING and t.key not in waiting]
        if new and self.affords_start(self.committed(screen)):
            return Pick(Kind.START, (new[0].key,))
        folds = [t for t in trials if t.fold]
        self._note(folds, now)
        order = self.fold_order([t for t in folds if t.state in WAITING], folds)
        if order:
            self.leaving.discard(order[0].key)
        fold = Pick(Kind.START if order[0].state is State.PENDING else Kind.RESUME, (order[0].key,)) if order else None
        if any(t.state is State.RUNNING for t in screen):
            return fold or NOTHING  # screening goes on; a worker it leaves free takes a fold run
        chosen = [k for k in self.promoter.close() if k in waiting]
        if chosen:
            self.resume += chosen[1:]
            return Pick(Kind.RESUME, (chosen[0],))
        # Waiting at a rung for good, or new but beyond the budget: the sweep ends without them.
        hopeless = tuple(k for k in [*waiting, *(t.key for t in new)] if k not in self.stopped)
        if hopeless:
            self.stopped.update(hopeless)
            return Pick(Kind.STOP, hopeless)
        return fold or NOTHING

    def _held(self, t: TrialView) -> bool:
        """A screening trial waiting at a rung (not new): paused (not one held back by the budget before it ever
        ran), or created again while the promoter holds it."""
        if t.state is State.PAUSED:
            return not self.never_started(t)
        return t.state is State.PENDING and self.enters_paused(t.key)

    # -- fold runs --------------------------------------------------------------------------------------

    def costs(self, folds: Iterable[TrialView]) -> dict[str, float]:
        """Each fold run's hours per epoch (:func:`arch_costs`), with the promoter's record of its finalist's
        screening (GPU-hours per epoch) where no fold run carries a cost."""
        return arch_costs(folds, self._screened_cost)

    def _screened_cost(self, finalist: str) -> float:
        reached, hours = self.promoter.reached(finalist), self.promoter.gpu_hours.get(finalist)
        return hours / self.promoter.rungs[reached - 1] if hours and reached else math.nan

    def fold_order(self, candidates: Sequence[TrialView], folds: Sequence[TrialView] | None = None) -> list[TrialView]:
        """``candidates`` (fold runs) by hours left (:func:`by_hours_left`), costed over ``folds`` (every fold
        run; default the candidates)."""
        return by_hours_left(candidates, self.costs(folds if folds is not None else candidates))

    def should_yield(self, trial: TrialView, trials: Sequence[TrialView], free_workers: int, now: float) -> bool:
        """Whether running fold run ``trial``, at the end of epoch ``trial.epoch``, gives its worker up (the rule in
        the class's docstring). ``free_workers``: how many more trials like it fit beside every running one.
        True also records it as leaving until it is picked again or ends."""
        if not self.preempt:
            return False
        self.leaving.discard(trial.key)  # it reports a result: it is running, not leaving
        folds = [t for t in trials if t.fold]
        self._note(folds, now)
        cost = self.costs(folds)
        waiting = by_hours_left([t for t in folds if t.key != trial.key and t.state in WAITING], cost)
        if not waiting or now - self.waiting_since.get(waiting[0].key, now) < self.preempt_after_s:
            return False
        head = waiting[0]
        left = _left(trial, cost.get(trial.key, math.nan))
        if (
            not left > 0
            or not pre_empts(cost[trial.key], left, [(cost[head.key], _left(head, cost[head.key]))])
            or free_workers + len(self.leaving) > 0
            or self._screening_waits(trials)
        ):
            return False
        self.leaving.add(trial.key)
        return True

    def _screening_waits(self, trials: Sequence[TrialView]) -> bool:
        """Whether a screening trial waits for a worker: it would take the one a yielding fold run frees."""
        if self.resume:
            return True
        screen = [t for t in trials if not t.fold and t.key not in self.stopped and t.state in WAITING]
        if set(self.promoter.promotable()) & {t.key for t in screen}:
            return True
        return any(t.state is State.PENDING and t.key not in self.promoter.paused for t in screen)

    def _note(self, folds: Sequence[TrialView], now: float) -> None:
        """Keep when each waiting fold run began to wait, and which yielding runs have not yet paused or ended
        (only a running one is still leaving; a paused one holds no worker)."""
        for t in folds:
            if t.state in WAITING:
                self.waiting_since.setdefault(t.key, now)
            else:
                self.waiting_since.pop(t.key, None)
            if t.state is not State.RUNNING:
                self.leaving.discard(t.key)

    # -- persistence ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The state ``promoter.json`` holds: the promoter's, the promoted trials not yet running again and the
        grid points never started. Waits,
        yields and stops are not kept: after a restart they start again (a stopped trial has ended by then)."""
        return {"promoter": self.promoter.to_dict(), "resume": list(self.resume), "unstarted": dict(self.unstarted)}

    def load(self, d: dict[str, Any]) -> None:
        """Take the state of :meth:`to_dict` in place (the promoter object is kept: others hold it)."""
        self.promoter.__dict__.update(Promoter.from_dict(d["promoter"]).__dict__)
        self.resume = list(d.get("resume", []))
        self.unstarted = dict(d.get("unstarted", {}))
        self.leaving, self.waiting_since, self.stopped = set(), {}, set()

    @staticmethod
    def from_dict(d: dict[str, Any], preempt: bool = True, preempt_after_s: float = PREEMPT_AFTER_S) -> Dispatch:
        return Dispatch(
            Promoter.from_dict(d["promoter"]), preempt, preempt_after_s, list(d.get("resume", [])),
            unstarted=dict(d.get("unstarted", {})),
        )  # fmt: skip


def arch_costs(folds: Iterable[TrialView], fallback: Callable[[str], float] | None = None) -> dict[str, float]:
    """Each fold run's hours per epoch: the mean ``cost`` of the fold runs of its architecture, so that runs of
    one architecture cost the same. Where no fold run carries a cost, ``fallback(finalist)`` instead (all or
    none: the two may be in different units). NaN where neither is known."""
    folds = list(folds)
    carried = any(t.cost == t.cost for t in folds)
    by_arch: dict[str, list[float]] = {}
    for t in folds:
        hours = t.cost if carried or fallback is None else fallback(t.finalist)
        if hours == hours:
            by_arch.setdefault(t.arch, []).append(hours)
    mean = {a: sum(v) / len(v) for a, v in by_arch.items()}
    return {t.key: mean.get(t.arch, math.nan) for t in folds}


def by_hours_left(candidates: Sequence[TrialView], cost: dict[str, float]) -> list[TrialView]:
    """Fold runs, the one with the most hours left first (``cost[key]`` per epoch times the epochs it has
    left): of those not started, the costliest architecture's first, since a long run started last holds the
    sweep's end back (:func:`~geopose_ray.sweep.order.longest_first`); unknown costs last; ties in the given
    order."""
    return [candidates[i] for i in longest_first([_left(t, cost.get(t.key, math.nan)) for t in candidates])]


def _left(t: TrialView, cost: float) -> float:
    """A fold run's hours to its last epoch."""
    return (t.epochs - t.epoch) * cost

"""A discrete-event replay of a sweep on W workers, and the scheduling policies it compares.

A worker (one T4) runs one trial at a time. A policy hands a free worker a job, (trial, epoch to stop at); the
trial trains from where it last stopped, one epoch costing its minutes per epoch, until that epoch or the
epoch in which it errors. At the stop the policy sees the reported scores and either keeps the trial on its
worker with a new stop epoch or lets the worker go. When no job is left for a free worker and nothing runs,
the policy is told it is idle and may create more work (the promoter's ``close``). Policies see only
:attr:`Curves.observed` (and an error when it happens): never the true final scores.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from geopose_ray.errors import ConfigError
from geopose_ray.simulate.curves import Curves
from geopose_ray.sweep.dispatch import PREEMPT_AFTER_S, Dispatch, Kind, State, TrialView
from geopose_ray.sweep.order import GuidedOrder
from geopose_ray.sweep.promoter import Decision, Promoter


class Policy(Protocol):
    name: str

    def next_job(self, now: float, free: int) -> tuple[int, int] | None:
        """(trial, epoch to stop at) for a free worker (``free`` of them, at hour ``now``), or None: nothing to
        hand out now."""
        ...

    def on_stop(self, trial: int, epoch: int, now: float, free: int) -> int | None:
        """The trial reached the stop epoch (hour ``now``, ``free`` workers idle): a further stop epoch keeps it
        on its worker; None frees it."""
        ...

    def on_error(self, trial: int, epoch: int) -> None:
        """The trial errored in ``epoch`` (no result for it): its worker is free."""
        ...

    def on_idle(self) -> bool:
        """No job for any free worker and nothing runs: True if the policy made more work."""
        ...


@dataclass
class Run:
    """What one policy did on one population."""

    policy: str
    workers: int
    epochs: np.ndarray  # (n,) screening epochs trained per trial, every segment counted
    reached: np.ndarray  # (n,) the last epoch each trial trained
    gpu_hours: float  # busy worker-time, integrated over the replay (fold runs included)
    makespan_h: float  # hours from the first start to the last stop
    finishes: list[tuple[float, float, int]] = field(default_factory=list)  # (hour, GPU-hours spent, trial) at the top
    screen_h: float = 0.0  # hour of the last screening stop (= makespan_h without fold runs)
    screen_busy_h: float = 0.0  # busy worker-hours up to screen_h, fold runs included
    fold_gpu_hours: float = 0.0  # GPU-hours of fold runs
    held_idle_h: float = 0.0  # idle worker-hours an autoscaling pool pays for (see :func:`replay`)
    fold_finishes: list[tuple[float, float, int]] = field(default_factory=list)  # (hour, GPU-hours, job) of fold runs
    fold_restarts: int = 0  # pre-empted fold runs taken up again, each costing RESUME_H

    @property
    def utilisation(self) -> float:
        """Of a fixed pool: busy worker-time / (workers × makespan)."""
        return self.gpu_hours / (self.workers * self.makespan_h) if self.makespan_h > 0 else 0.0

    @property
    def autoscaled_utilisation(self) -> float:
        """Of an autoscaling pool: busy worker-time / the worker-time it holds (busy, idle until released, starts)."""
        held = self.gpu_hours + self.held_idle_h
        return self.gpu_hours / held if held > 0 else 0.0

    @property
    def screen_utilisation(self) -> float:
        return self.screen_busy_h / (self.workers * self.screen_h) if self.screen_h > 0 else 0.0


IDLE_TIMEOUT_H = 5 / 60  # launch/*-t4.yaml's idle_timeout_minutes: an idle worker is released after this
START_H = 5 / 60  # assumed: a released worker's replacement takes this long to start (held, not busy)
RESUME_H = 3 / 60  # assumed: a pre-empted fold run's restart (checkpoint, process, model and data) on a worker


def replay(curves: Curves, workers: int, policy: Policy, fold_runs: int = 0) -> Run:
    """Replay ``policy`` on ``workers`` workers until it has nothing left to do.

    Besides the fixed pool's busy time, it counts what an autoscaling pool of at most ``workers`` holds idle:
    a worker freed at t and given work again at t' (the most recently freed first) costs min(t' − t,
    :data:`IDLE_TIMEOUT_H`), plus :data:`START_H` for a new worker if it had been released; one never used
    again costs min(end − t, IDLE_TIMEOUT_H).

    With ``fold_runs`` = K − 1, job ids n + t·(K − 1) + k (k < K − 1) are trial t's runs on its other folds: the
    top rung's epochs at the trial's cost, never erroring, not counted as screening (see :class:`SweepPolicy`). A
    fold run a free worker takes up part-way (it was pre-empted) first spends :data:`RESUME_H` restarting, busy.
    """
    if workers < 1:
        raise ConfigError(f"The value of `workers` is {workers}, but must be `workers >= 1`")
    n, top = len(curves), curves.top
    size = n * (1 + fold_runs)
    base = np.concatenate([np.arange(n), np.repeat(np.arange(n), fold_runs)])  # job id -> its screening trial
    fail = np.concatenate([curves.fail_epoch, np.full(n * fold_runs, top + 1)])
    at = np.zeros(size, dtype=int)
    epochs = np.zeros(size, dtype=int)
    heap: list[tuple[float, int, int, int]] = []  # (end hour, sequence, job id, stop epoch)
    seq = 0
    now = spent = screen_h = screen_busy = 0.0
    free = workers
    finishes: list[tuple[float, float, int]] = []
    fold_finishes: list[tuple[float, float, int]] = []
    freed: list[float] = []  # when each free worker of the autoscaling pool was freed (none yet at the start)
    held_idle = 0.0
    restarts = 0  # fold runs taken up part-way

    def launch(job: int, stop: int, taken_up: bool) -> None:
        nonlocal seq, held_idle, restarts
        if not (0 <= job < size and at[job] < stop <= top):
            raise ConfigError(f"{policy.name} asked job {job} to run from epoch {at[job]} to {stop}")
        if freed and taken_up:
            gap = now - freed.pop()
            held_idle += min(gap, IDLE_TIMEOUT_H) + (START_H if gap > IDLE_TIMEOUT_H else 0.0)
        end = min(stop, int(fail[job]))
        hours = curves.hours(int(base[job]), end - at[job])
        if taken_up and job >= n and at[job] > 0:
            hours += RESUME_H
            restarts += 1
        heapq.heappush(heap, (now + hours, seq, job, end))
        seq += 1

    while True:
        while free:
            job = policy.next_job(now, free)
            if job is None:
                break
            launch(*job, taken_up=True)
            free -= 1
        if not heap:
            if policy.on_idle():
                continue
            break
        end_h, _, trial, epoch = heapq.heappop(heap)
        spent += (len(heap) + 1) * (end_h - now)  # the popped segment and those still in the heap ran
        now = end_h
        epochs[trial] += epoch - at[trial]
        at[trial] = epoch
        if trial < n:
            screen_h, screen_busy = now, spent
        if epoch >= fail[trial]:
            policy.on_error(trial, epoch)
            free += 1
            freed.append(now)
            continue
        if epoch == top:
            (finishes if trial < n else fold_finishes).append((now, spent, trial))
        nxt = policy.on_stop(trial, epoch, now, free)
        if nxt is None:
            free += 1
            freed.append(now)
        else:
            launch(trial, nxt, taken_up=False)
    held_idle += sum(min(now - t, IDLE_TIMEOUT_H) for t in freed)
    fold_hours = float(np.sum(epochs[n:] * curves.minutes[base[n:]]) / 60.0) + restarts * RESUME_H
    return Run(
        policy.name, workers, epochs[:n], at[:n].copy(), spent, now, finishes, screen_h, screen_busy, fold_hours,
        held_idle_h=held_idle, fold_finishes=fold_finishes, fold_restarts=restarts,
    )  # fmt: skip


class Arrivals:
    """The new trials a policy starts: in the given order, or (``guided``) in a :class:`GuidedOrder` over the
    trials' decoder, encoder, learning rate and accumulation that learns from the first-rung scores the policy
    passes to :meth:`observe`.

    A guided order decides ``lag`` trials ahead, as Ray Tune does: it keeps that many suggested trials pending
    (the driver's ``pending_trials``), so a trial's configuration is chosen before the results of the ones
    started just before it are in.
    """

    def __init__(self, curves: Curves, order: Sequence[int], guided: bool = False, lag: int = 0, seed: int = 0) -> None:
        self.fixed: deque[int] = deque(order)
        self.guided: GuidedOrder | None = None
        self.lag = lag
        self.exhausted = not order
        if guided:
            keys = ("decoder", "encoder", "lr", "accumulation")
            levels = curves.params or [dict(zip(keys, n.split("/"), strict=True)) for n in curves.names]
            self.guided = GuidedOrder(levels, seed=seed)
            self.fixed.clear()

    def _suggest(self) -> None:
        assert self.guided is not None
        while len(self.fixed) <= self.lag and (trial := self.guided.next()) is not None:
            self.fixed.append(trial)

    def __bool__(self) -> bool:
        if self.guided is not None:
            self._suggest()
        return bool(self.fixed)

    def popleft(self) -> int:
        if self.guided is not None:
            self._suggest()
        return self.fixed.popleft()

    def observe(self, trial: int, score: float | None) -> None:
        if self.guided is not None:
            self.guided.observe(trial, score)

    def create(self) -> int | None:
        """The next trial, decided now (no look-ahead: the caller keeps its own pending trials); None when every
        trial has been handed out."""
        if self.fixed:
            return self.fixed.popleft()
        trial = self.guided.next() if self.guided is not None else None
        if trial is None:
            self.exhausted = True
        return trial


class GridPolicy:
    """Every trial trained to the top rung, in arrival order."""

    name = "grid"

    def __init__(self, curves: Curves, order: Sequence[int]) -> None:
        self.top = curves.top
        self.pending = deque(order)

    def next_job(self, now: float = 0.0, free: int = 1) -> tuple[int, int] | None:
        return (self.pending.popleft(), self.top) if self.pending else None

    def on_stop(self, trial: int, epoch: int, now: float = 0.0, free: int = 0) -> int | None:
        return None

    def on_error(self, trial: int, epoch: int) -> None:
        pass

    def on_idle(self) -> bool:
        return False


class RandomPolicy:
    """Random search: trials in a random order, each trained to the top rung, while the GPU-hours committed
    (a running trial counts its full cost; an errored one gives back what it did not use) stay within budget."""

    name = "random"

    def __init__(self, curves: Curves, order: Sequence[int], budget_gpu_hours: float) -> None:
        self.curves = curves
        self.pending = deque(order)
        self.budget = budget_gpu_hours
        self.committed = 0.0

    def next_job(self, now: float = 0.0, free: int = 1) -> tuple[int, int] | None:
        if not self.pending:
            return None
        cost = self.curves.hours(self.pending[0], self.curves.top)
        if self.committed + cost > self.budget:
            return None
        self.committed += cost
        return self.pending.popleft(), self.curves.top

    def on_stop(self, trial: int, epoch: int, now: float = 0.0, free: int = 0) -> int | None:
        return None

    def on_error(self, trial: int, epoch: int) -> None:
        self.committed -= self.curves.hours(trial, self.curves.top - epoch)

    def on_idle(self) -> bool:
        return False


class AshaPolicy:
    """Ray Tune's ``AsyncHyperBandScheduler`` rule, stop-based: a trial arriving at a rung is stopped for good if
    its score is below the (1 − 1/η) quantile (numpy's linear percentile, as Ray's ``_Bracket.cutoff``) of the
    scores recorded there before it; otherwise it continues. Its score is then recorded. The first arrival at a
    rung always continues. New trials start in arrival order; the top rung ends a trial."""

    def __init__(
        self, curves: Curves, order: Sequence[int], rungs: Sequence[int], eta: int, guided: bool = False, lag: int = 0
    ) -> None:
        self.name = "asha, guided order" if guided else "asha"
        self.curves = curves
        self.pending = Arrivals(curves, order, guided, lag, seed=order[0] if order else 0)
        self.rungs = list(rungs)
        self.eta = eta
        self.recorded: list[list[float]] = [[] for _ in self.rungs[:-1]]
        self.stopped: set[int] = set()

    def next_job(self, now: float = 0.0, free: int = 1) -> tuple[int, int] | None:
        return (self.pending.popleft(), self.rungs[0]) if self.pending else None

    def on_stop(self, trial: int, epoch: int, now: float = 0.0, free: int = 0) -> int | None:
        i = self.rungs.index(epoch)
        value = float(self.curves.observed[trial, epoch - 1])
        if i == 0:
            self.pending.observe(trial, value)
        if i == len(self.rungs) - 1:
            return None
        recorded = self.recorded[i]
        stop = bool(recorded) and value < float(np.nanpercentile(recorded, (1 - 1 / self.eta) * 100))
        recorded.append(value)
        if stop:
            self.stopped.add(trial)
            return None
        return self.rungs[i + 1]

    def on_error(self, trial: int, epoch: int) -> None:
        if epoch <= self.rungs[0]:
            self.pending.observe(trial, None)

    def on_idle(self) -> bool:
        return False


class SweepPolicy:
    """The sweep's own dispatch policy, :class:`~geopose_ray.sweep.dispatch.Dispatch` (the object the Ray
    scheduler runs), driven by the simulated cluster: the promoter's screening, then each finalist's runs on its
    K − 1 other folds (``fold_runs`` = K − 1; job ids as :func:`replay` numbers them).

    Every epoch a screening trial trains is reported to the policy (with its GPU-hours so far), rung to rung
    without a budget (nothing between rungs changes a decision) and epoch by epoch with one; a fold run reports
    every epoch with ``preempt`` (the policy may take its worker at any epoch's end), else runs to the top rung.
    New trials are created as the driver's searcher creates them, ``lag`` ahead (Ray Tune's pending trials), in
    ``order`` or, ``guided``, in a :class:`~geopose_ray.sweep.order.GuidedOrder` over the first-rung scores.

    ``backfill`` is ``search: guided``: a finalist's fold runs wait for a worker as soon as it is a finalist,
    and the policy gives them the workers screening leaves idle. Without it (``search: grid``) they start once
    screening is over, as the driver's second Tuner does. The clock is the simulator's hours; the policy's
    wait before a pre-emption (``preempt_after_s``) is in seconds of it.
    """

    def __init__(
        self,
        curves: Curves,
        order: Sequence[int],
        rungs: Sequence[int],
        eta: int,
        min_results: int,
        budget_gpu_hours: float | None = None,
        guided: bool = False,
        lag: int = 0,
        fold_runs: int = 0,
        backfill: bool = True,
        preempt: bool = False,
        preempt_after_s: float = PREEMPT_AFTER_S,
        top_k: int | None = None,
    ) -> None:
        self.name = "promoter, guided order" if guided else "promoter"
        self.top_k = top_k  # fold runs for the best top_k finalists only (the driver's fold_runs.top_k)
        if fold_runs:
            self.name += f" + folds {'backfilled' if backfill else 'after'}"
            if preempt:
                self.name += ", pre-empted"
        self.curves = curves
        promoter = Promoter(rungs, eta, "max", min_results, budget_gpu_hours)
        self.rungs = list(promoter.rungs)
        if self.rungs[-1] != curves.top:
            raise ConfigError(f"The top rung {self.rungs[-1]} must be the curves' last epoch {curves.top}")
        self.dispatch = Dispatch(promoter, preempt=preempt, preempt_after_s=preempt_after_s)
        # The searcher: new trials decided as they are created, in order or in the guided order.
        self.arrivals = Arrivals(curves, order, guided, seed=order[0] if order else 0)
        self.lag = lag
        self.every_epoch = budget_gpu_hours is not None
        self.n, self.top, self.fold_runs = len(curves), curves.top, fold_runs
        self.backfill, self.preempt = backfill, preempt
        self.names = [f"t{i:05d}" for i in range(self.n)]
        self.jobs: dict[str, int] = {}  # key -> job id
        self.views: dict[str, TrialView] = {}  # the trials that may run again, screening ones in creation order
        self.later: list[TrialView] = []  # fold runs held until screening is over (no backfill)
        self.reported = np.zeros(self.n, dtype=int)
        self.screening = 0  # screening trials created and not ended

    def _key(self, job: int) -> str:
        if job < self.n:
            return self.names[job]
        t, k = divmod(job - self.n, self.fold_runs)
        return f"{self.names[t]}/fold{k + 1}"

    def _set(self, key: str, **change: object) -> TrialView:
        v = self.views[key] = replace(self.views[key], **change)  # type: ignore[arg-type]
        return v

    def _end(self, key: str) -> None:
        if not self.views.pop(key).fold:
            self.screening -= 1

    def _create(self) -> None:
        """New screening trials, as the searcher hands them out: ``lag`` + 1 waiting to start at most."""
        waiting = sum(1 for v in self.views.values() if not v.fold and v.state is State.PENDING and v.epoch == 0)
        while waiting <= self.lag and (trial := self.arrivals.create()) is not None:
            key = self.names[trial]
            self.jobs[key] = trial
            self.views[key] = TrialView(key, fold=False, state=State.PENDING, epochs=self.top)
            self.screening += 1
            waiting += 1

    def next_job(self, now: float = 0.0, free: int = 1) -> tuple[int, int] | None:
        while True:
            self._create()
            pick = self.dispatch.pick(list(self.views.values()), free, now * 3600.0)
            if pick.kind is Kind.STOP:
                for key in pick.keys:
                    self._end(key)
                continue
            if pick.key is None:
                if self.later and self.screening == 0 and self.arrivals.exhausted:
                    best = set(self.dispatch.promoter.ranked_finalists()[: self.top_k])
                    for v in self.later:  # screening is over: the fold runs' Tuner starts, the best top_k's
                        if v.finalist in best:
                            self.views[v.key] = v
                    self.later = []
                    continue
                return None
            v = self._set(pick.key, state=State.RUNNING)
            return self.jobs[v.key], self._stop_after(v)

    def _stop_after(self, v: TrialView) -> int:
        if v.fold:
            return v.epoch + 1 if self.preempt else self.top
        if self.every_epoch:
            return v.epoch + 1
        return next(r for r in self.rungs if r > v.epoch)

    def _report(self, trial: int, upto: int) -> Decision:
        decision = Decision.CONTINUE
        key = self.names[trial]
        for e in range(int(self.reported[trial]) + 1, upto + 1):
            value = float(self.curves.observed[trial, e - 1])
            me = replace(self.views[key], epoch=e)
            others = [me if v.key == key else v for v in self.views.values()] if self.every_epoch else ()
            decision = self.dispatch.on_result(me, value, self.curves.hours(trial, e), others)
            if e == self.rungs[0]:
                self.arrivals.observe(trial, value)
        self.reported[trial] = upto
        return decision

    def on_stop(self, trial: int, epoch: int, now: float = 0.0, free: int = 0) -> int | None:
        key = self._key(trial)
        if trial >= self.n:  # a fold run
            v = self._set(key, epoch=epoch)
            if epoch >= self.top:
                self._end(key)
                return None
            decision = self.dispatch.on_result(v, math.nan, 0.0, list(self.views.values()), free, now * 3600.0)
            if decision is Decision.YIELD:
                self._set(key, state=State.PAUSED)
                return None
            return epoch + 1
        decision = self._report(trial, epoch)
        self._set(key, epoch=epoch)
        if decision is Decision.CONTINUE:
            return self._stop_after(self.views[key])
        if decision is Decision.FINALIST:
            self._end(key)
            self._add_folds(trial)
        else:
            self._set(key, state=State.PAUSED)
        return None

    def _add_folds(self, trial: int) -> None:
        if self.backfill and self.top_k is not None:  # as the guided searcher: within the best top_k so far
            p = self.dispatch.promoter
            if self.names[trial] not in p.ranked_finalists()[: self.top_k]:
                return
        name = self.curves.names[trial].split("/")
        arch, cost = "/".join(name[:2]), float(self.curves.minutes[trial]) / 60.0
        for k in range(self.fold_runs):
            job = self.n + trial * self.fold_runs + k
            key = self._key(job)
            self.jobs[key] = job
            v = TrialView(key, True, State.PENDING, 0, self.top, cost, arch, self.names[trial])
            if self.backfill:
                self.views[key] = v
            else:
                self.later.append(v)

    def on_error(self, trial: int, epoch: int) -> None:
        self._report(trial, epoch - 1)  # the epochs before the failing one were reported; Tune ends the trial
        if epoch <= self.rungs[0]:
            self.arrivals.observe(trial, None)
        self._end(self.names[trial])

    def on_idle(self) -> bool:
        return False  # next_job runs the policy's rule for an idle sweep (the promoter's close)

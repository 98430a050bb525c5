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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from geopose_ray.errors import ConfigError
from geopose_ray.simulate.curves import Curves
from geopose_ray.sweep.order import GuidedOrder, longest_first, pre_empts
from geopose_ray.sweep.promoter import Decision, Promoter


class Policy(Protocol):
    name: str

    def next_job(self) -> tuple[int, int] | None:
        """(trial, epoch to stop at) for a free worker, or None: nothing to hand out now."""
        ...

    def on_stop(self, trial: int, epoch: int) -> int | None:
        """The trial reached the stop epoch: a further stop epoch keeps it on its worker; None frees it."""
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
    top rung's epochs at the trial's cost, never erroring, not counted as screening (see :class:`FoldRuns`). A
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
            job = policy.next_job()
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
        nxt = policy.on_stop(trial, epoch)
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
        if guided:
            keys = ("decoder", "encoder", "lr", "accumulation")
            self.guided = GuidedOrder([dict(zip(keys, n.split("/"), strict=True)) for n in curves.names], seed=seed)
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


class GridPolicy:
    """Every trial trained to the top rung, in arrival order."""

    name = "grid"

    def __init__(self, curves: Curves, order: Sequence[int]) -> None:
        self.top = curves.top
        self.pending = deque(order)

    def next_job(self) -> tuple[int, int] | None:
        return (self.pending.popleft(), self.top) if self.pending else None

    def on_stop(self, trial: int, epoch: int) -> int | None:
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

    def next_job(self) -> tuple[int, int] | None:
        if not self.pending:
            return None
        cost = self.curves.hours(self.pending[0], self.curves.top)
        if self.committed + cost > self.budget:
            return None
        self.committed += cost
        return self.pending.popleft(), self.curves.top

    def on_stop(self, trial: int, epoch: int) -> int | None:
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

    def next_job(self) -> tuple[int, int] | None:
        return (self.pending.popleft(), self.rungs[0]) if self.pending else None

    def on_stop(self, trial: int, epoch: int) -> int | None:
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


class PromoterPolicy:
    """The project's promoter, the real :class:`Promoter`, dispatched as a Ray scheduler would.

    Every epoch's score goes to ``on_result`` (with the trial's GPU-hours so far). CONTINUE keeps the trial on
    its worker; PAUSE and FINALIST free it. A free worker resumes the first trial :meth:`Promoter.promotable`
    names (from its checkpoint: no epoch is trained again), else starts a new trial; with ``new_first`` it
    starts new trials first and resumes only when none is left (an ablation: ``PromoterScheduler``
    promotes first, as here). When no new trial is left and nothing runs, :meth:`Promoter.close` decides what resumes.
    Without a budget the trial runs rung to rung (nothing between rungs changes a decision); with one it stops
    every epoch, so the spent GPU-hours are current when a rung decides.
    """

    def __init__(
        self,
        curves: Curves,
        order: Sequence[int],
        rungs: Sequence[int],
        eta: int,
        min_results: int,
        budget_gpu_hours: float | None = None,
        new_first: bool = False,
        guided: bool = False,
        lag: int = 0,
    ) -> None:
        self.name = "promoter (new trials first)" if new_first else "promoter"
        if guided:
            self.name += ", guided order"
        self.curves = curves
        self.promoter = Promoter(rungs, eta, "max", min_results, budget_gpu_hours)
        self.rungs = list(self.promoter.rungs)
        if self.rungs[-1] != curves.top:
            raise ConfigError(f"The top rung {self.rungs[-1]} must be the curves' last epoch {curves.top}")
        self.pending = Arrivals(curves, order, guided, lag, seed=order[0] if order else 0)
        self.resume: deque[int] = deque()
        self.new_first = new_first
        self.every_epoch = budget_gpu_hours is not None
        self.names = [f"t{i:05d}" for i in range(len(curves))]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.reported = np.zeros(len(curves), dtype=int)

    def _stop_after(self, epoch: int) -> int:
        return epoch + 1 if self.every_epoch else next(r for r in self.rungs if r > epoch)

    def next_job(self) -> tuple[int, int] | None:
        if self.resume:
            trial = self.resume.popleft()
        elif self.new_first and self.pending:
            trial = self.pending.popleft()
        elif ready := self.promoter.promotable():
            self.promoter.promote(ready[0])
            trial = self.index[ready[0]]
        elif self.pending:
            trial = self.pending.popleft()
        else:
            return None
        return trial, self._stop_after(int(self.reported[trial]))

    def _report(self, trial: int, upto: int) -> Decision:
        decision = Decision.CONTINUE
        for e in range(int(self.reported[trial]) + 1, upto + 1):
            value = float(self.curves.observed[trial, e - 1])
            decision = self.promoter.on_result(self.names[trial], e, value, self.curves.hours(trial, e))
            if e == self.rungs[0]:
                self.pending.observe(trial, value)
        self.reported[trial] = upto
        return decision

    def on_stop(self, trial: int, epoch: int) -> int | None:
        decision = self._report(trial, epoch)
        return self._stop_after(epoch) if decision is Decision.CONTINUE else None

    def on_error(self, trial: int, epoch: int) -> None:
        self._report(trial, epoch - 1)  # the epochs before the failing one were reported; Tune drops the trial
        if epoch <= self.rungs[0]:
            self.pending.observe(trial, None)

    def on_idle(self) -> bool:
        if self.pending:
            return False
        chosen = self.promoter.close()
        self.resume.extend(self.index[t] for t in chosen)
        return bool(chosen)


class FoldRuns:
    """A screening policy followed by every finalist's runs on its K − 1 other folds (the design's next stage).

    ``backfill=False`` is the driver with ``search: grid``: the fold runs start once screening is over (a second
    Tuner). ``backfill=True`` is ``search: guided``: a worker that screening leaves idle takes a finalist's fold
    run instead; screening still goes first whenever it has a job, and the inner policy's idle rule (the
    promoter's ``close``) runs as soon as no screening trial runs, fold runs or not. ``longest_first`` starts
    the waiting fold run of the most expensive architecture first, as the driver does
    (:func:`~geopose_ray.sweep.order.longest_first`); without it they start in the order their finalists finished.

    ``preempt`` is the driver's rule (:func:`~geopose_ray.sweep.order.pre_empts`, as the guided driver's scheduler
    applies it): fold runs train an epoch at a time, and a waiting fold run of a costlier architecture (more minutes
    per epoch) with more than ``PREEMPT_RATIO`` times the hours left of a running one takes its worker; the
    pre-empted run waits with its epochs kept, and a free worker takes the waiting fold run with the most hours
    left. Runs of equally costly architectures never pre-empt each other, so a finalist's runs are not interleaved
    with its peers' and restarts stay few.
    """

    def __init__(
        self,
        inner: Policy,
        curves: Curves,
        fold_runs: int,
        backfill: bool,
        longest_first: bool = True,
        preempt: bool = False,
    ) -> None:
        self.name = f"{inner.name} + folds {'backfilled' if backfill else 'after'}"
        if preempt:
            self.name += ", pre-empted"
        elif not longest_first:
            self.name += ", in finishing order"
        self.preempt = preempt
        self.done: dict[int, int] = {}  # fold run -> epochs it has trained (pre-emption only)
        self.inner = inner
        self.minutes = curves.minutes
        self.longest_first = longest_first
        self.n, self.top = len(curves), curves.top
        self.fold_runs = fold_runs
        self.backfill = backfill
        self.queue: deque[int] = deque()
        self.screening = 0  # screening segments running
        self.screened = False  # the inner policy has nothing left

    def next_job(self) -> tuple[int, int] | None:
        if not self.screened:
            job = self.inner.next_job()
            while job is None and self.screening == 0 and self.inner.on_idle():
                job = self.inner.next_job()
            if job is not None:
                self.screening += 1
                return job
            self.screened = self.screening == 0
            if not (self.backfill or self.screened):
                return None
        if not self.queue:
            return None
        if self.preempt:
            fold = max(self.queue, key=self._hours_left)
            self.queue.remove(fold)
            return fold, self.done.get(fold, 0) + 1
        if self.longest_first:
            fold = self.queue[longest_first([self._minutes(j) for j in self.queue])[0]]
            self.queue.remove(fold)
            return fold, self.top
        return self.queue.popleft(), self.top

    def _minutes(self, job: int) -> float:
        return float(self.minutes[(job - self.n) // self.fold_runs])

    def _hours_left(self, job: int) -> float:
        return (self.top - self.done.get(job, 0)) * self._minutes(job) / 60.0

    def on_stop(self, trial: int, epoch: int) -> int | None:
        if trial >= self.n:
            if not self.preempt or epoch == self.top:
                return None
            self.done[trial] = epoch
            waiting = [(self._minutes(j), self._hours_left(j)) for j in self.queue]
            if pre_empts(self._minutes(trial), self._hours_left(trial), waiting):
                self.queue.append(trial)  # pre-empted: its worker goes to the waiting run with more hours left
                return None
            return epoch + 1
        nxt = self.inner.on_stop(trial, epoch)
        if epoch == self.top:
            self.queue.extend(self.n + trial * self.fold_runs + k for k in range(self.fold_runs))
        if nxt is None:
            self.screening -= 1
        return nxt

    def on_error(self, trial: int, epoch: int) -> None:
        self.inner.on_error(trial, epoch)
        self.screening -= 1

    def on_idle(self) -> bool:
        return False  # next_job already ran the inner policy's idle rule

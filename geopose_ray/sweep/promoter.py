"""The promoter's rules: asynchronous successive halving with pause and resume, as a pure state machine.

Rungs are epochs (default 20, 60, 200) and η is the reduction factor (default 3). When a trial reaches a rung
its metric is recorded there. It continues if it ranks in the top ⌊n/η⌋ of the n results recorded at that rung
so far (and the rung holds at least ``min_results``); otherwise it pauses. A paused trial is promoted later,
as soon as the rung has filled enough for it to rank in the top ⌊n/η⌋; it then resumes from its checkpoint,
so no epoch is trained twice. A trial that reaches the top rung is a finalist.

The GPU-hour budget is a cap on screening, not a stop on promotions alone: a trial starts, or continues towards
its next rung, only while the hours spent, plus those the running trials still need to reach their next rungs,
plus its own to its next rung fit in the budget (:meth:`Promoter.affords`; a trial's hours per epoch are its
own so far, else the mean of those that have reported); and within its rung's share: the budget is split over
the rungs as successive halving would spend it on the most trials it affords (:meth:`Promoter.rung_shares`), a
rung's unspent share passing to those above, so the first rungs never spend what taking the best to the top
rung needs. So the sweep spends at most the budget, plus what the
estimates of the running trials' hours miss; the trials that cannot be afforded wait (paused ones keep their
checkpoints, for a reopened sweep with a larger budget) and the grid points never started are not started.

Unlike stop-based ASHA, a trial below the cut-off is not killed: a late bloomer that looked mediocre when it
arrived early at a rung is promoted once enough weaker trials have arrived behind it.

No Ray here: the Ray Tune scheduler only turns these decisions into CONTINUE / PAUSE and picks the paused
trials :meth:`Promoter.promotable` names. The state round-trips through :meth:`to_dict` for driver restarts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from typing import Any

from geopose_ray.errors import ConfigError


def check_schedule(
    rungs: Sequence[int], eta: int, mode: str, min_results: int = 1, budget_gpu_hours: float | None = None
) -> None:
    """Raise :class:`ConfigError` naming the first of the promoter's settings that is not valid: rungs (positive,
    strictly increasing epochs), ``eta >= 2``, ``mode`` max or min, ``min_results >= 1``, a budget > 0 or None."""
    if not rungs or any(int(r) < 1 for r in rungs):
        raise ConfigError(f"The value of `rungs` is {list(rungs)}, but must be positive epochs")
    if any(b <= a for a, b in pairwise(rungs)):
        raise ConfigError(f"The value of `rungs` is {list(rungs)}, but must be strictly increasing")
    if eta < 2:
        raise ConfigError(f"The value of `eta` is {eta}, but must be `eta >= 2`")
    if mode not in ("max", "min"):
        raise ConfigError(f"The value of `mode` is {mode!r}, but must be 'max' or 'min'")
    if min_results < 1:
        raise ConfigError(f"The value of `min_results` is {min_results}, but must be `min_results >= 1`")
    if budget_gpu_hours is not None and not budget_gpu_hours > 0:
        raise ConfigError(f"The value of `budget_gpu_hours` is {budget_gpu_hours}, but must be > 0 or null")


def halving_counts(n: int, rungs: int, eta: int) -> list[int]:
    """Trials reaching each rung when ``n`` start: n, ⌊n/η⌋, ⌊n/η²⌋, ... (at least one at each rung)."""
    return [max(1, n // eta**r) if n else 0 for r in range(rungs)]


def halving_hours(n: int, rungs: Sequence[int], eta: int, per_epoch: float, spare: int = 0) -> float:
    """Expected GPU-hours of successive halving over ``n`` trials at ``per_epoch`` hours per epoch; ``spare``
    more trials at every rung above the first (asynchronous promotion takes a trial or so more per rung than
    ⌊n/η^r⌋, as it promotes before the rung is full)."""
    counts = [c + (spare if r and n else 0) for r, c in enumerate(halving_counts(n, len(rungs), eta))]
    steps = [b - a for a, b in zip([0, *rungs[:-1]], rungs, strict=True)]
    return per_epoch * sum(c * s for c, s in zip(counts, steps, strict=True))


Committed = float | Sequence[float]  # hours promised to running trials: in all, or per rung index (cumulative)


def _split(committed: Committed, rung: int | None) -> tuple[float, float]:
    """(in all, at epochs up to rung index ``rung``) of a :data:`Committed`; NaN counts nothing."""
    if isinstance(committed, int | float):
        v = float(committed) if committed == committed else 0.0
        return v, v
    total = float(committed[-1])
    return total, float(committed[rung]) if rung is not None else total


def _plus(committed: Committed, hours: float, rung: int) -> Committed:
    """``committed`` with ``hours`` more towards rung index ``rung`` (they count at that rung and above)."""
    if hours != hours:
        return committed
    if isinstance(committed, int | float):
        return float(committed) + hours
    return [c + (hours if i >= rung else 0.0) for i, c in enumerate(committed)]


class Decision(StrEnum):
    CONTINUE = "continue"  # not at a rung, or promoted on arrival
    PAUSE = "pause"  # at a rung, not (yet) in its top 1/η, or the budget is spent
    FINALIST = "finalist"  # reached the top rung: done screening
    YIELD = "yield"  # a fold run gives its worker up to a costlier one (sweep.dispatch), keeping its epochs


@dataclass
class Promoter:
    """The promotion rules and their state.

    Args:
        rungs: strictly increasing epochs at which trials are compared; the last is the top rung.
        eta: reduction factor: the top ⌊n/η⌋ of a rung's n results are promoted.
        mode: ``max`` or ``min`` of the metric.
        min_results: results a rung must hold before anyone is promoted from it.
        budget_gpu_hours: the GPU-hours screening may spend (None = no budget): see the module docstring.
    """

    rungs: Sequence[int] = (20, 60, 200)
    eta: int = 3
    mode: str = "max"
    min_results: int = 1
    budget_gpu_hours: float | None = None
    results: dict[int, dict[str, float]] = field(default_factory=dict)  # rung index -> trial -> metric
    promoted: dict[int, set[str]] = field(default_factory=dict)  # rung index -> trials promoted from it
    paused: dict[str, int] = field(default_factory=dict)  # trial -> rung index it waits at
    finalists: list[str] = field(default_factory=list)
    gpu_hours: dict[str, float] = field(default_factory=dict)  # trial -> GPU-hours so far
    epochs: dict[str, int] = field(default_factory=dict)  # trial -> epochs it has reported (its cost's divisor)

    def __post_init__(self) -> None:
        self.rungs = [int(r) for r in self.rungs]
        check_schedule(self.rungs, self.eta, self.mode, self.min_results, self.budget_gpu_hours)
        for i in range(len(self.rungs)):
            self.results.setdefault(i, {})
            self.promoted.setdefault(i, set())
        self._writes: Counter[int] = Counter()  # per rung, results recorded: the ranking cache's version
        self._spend: dict[Any, Any] = {}  # the budget's figures, for the spending recorded now (:meth:`_cached`)
        self._hours_version = 0  # bumped whenever a trial's GPU-hours or epochs change
        self._top: dict[int, tuple[tuple[int, int, int], set[str]]] = {}  # rung -> (version, its top)

    # -- queries ----------------------------------------------------------------------------------------

    def _cached(self, name: str, compute: Any) -> Any:
        """A figure of the spending so far, computed once per change of it (results, rungs, budget)."""
        key = (name, len(self.gpu_hours), self._hours_version, tuple(self.rungs), self.eta, self.budget_gpu_hours)
        if key not in self._spend:
            if len(self._spend) > 64:
                self._spend.clear()
            self._spend[key] = compute()
        return self._spend[key]

    @property
    def spent_gpu_hours(self) -> float:
        return float(self._cached("spent", lambda: sum(self.gpu_hours.values())))

    @property
    def budget_left(self) -> bool:
        return self.budget_gpu_hours is None or self.spent_gpu_hours < self.budget_gpu_hours

    @property
    def mean_epoch_cost(self) -> float:
        """The mean GPU-hours per epoch of the trials that have reported with their hours (NaN before any)."""

        def compute() -> float:
            costs = [self.gpu_hours[t] / e for t, e in self.epochs.items() if e > 0 and self.gpu_hours.get(t)]
            return sum(costs) / len(costs) if costs else math.nan

        return float(self._cached("mean", compute))

    def epoch_cost(self, trial: str) -> float:
        """A trial's GPU-hours per epoch: its own so far, else :attr:`mean_epoch_cost` (NaN if neither)."""
        epochs, hours = self.epochs.get(trial, 0), self.gpu_hours.get(trial)
        return hours / epochs if epochs > 0 and hours else self.mean_epoch_cost

    def next_rung(self, epoch: int) -> int:
        """The first rung above ``epoch`` (the top rung at or above it)."""
        return next((r for r in self.rungs if r > epoch), self.rungs[-1])

    def hours_to_next_rung(self, trial: str, epoch: int) -> float:
        """The GPU-hours ``trial``, at ``epoch``, needs to reach its next rung (NaN while no cost is known)."""
        return (self.next_rung(epoch) - epoch) * self.epoch_cost(trial)

    def affords(self, hours: float, committed: Committed = 0.0, rung: int | None = None) -> bool:
        """Whether ``hours`` more, towards rung index ``rung``, fit in the budget beside those spent and
        ``committed`` (the hours the running trials still need to reach their next rungs: a number, or per rung
        index the part of them at epochs up to that rung, :meth:`Dispatch.committed`): in all, and within the
        rungs up to ``rung``'s share (:meth:`rung_shares`: what the rungs above need is not theirs to spend).
        Always without a budget; while no trial's cost is known (NaN) only while budget is left, since the first
        trials must run to measure it."""
        if self.budget_gpu_hours is None:
            return True
        if hours != hours:
            return self.budget_left
        total, below = _split(committed, rung)
        if self.spent_gpu_hours + total + hours > self.budget_gpu_hours:
            return False
        if rung is None:
            return True
        share = self.rung_shares()[rung] * self.budget_gpu_hours
        return self.spent_up_to(rung) + below + hours <= share

    def rung_shares(self) -> list[float]:
        """The share of the budget the rungs up to each may spend, cumulative: as successive halving spends it over
        the most trials the budget affords at the mean hours per epoch (with a spare trial per rung above the
        first, :func:`halving_hours`), so a rung's unspent share passes to the rungs above and no rung spends what
        those above it need; all ones before any cost is known."""
        return list(self._cached("shares", self._rung_shares))

    def _rung_shares(self) -> list[float]:
        cost, budget = self.mean_epoch_cost, self.budget_gpu_hours
        if budget is None or cost != cost:
            return [1.0] * len(self.rungs)
        lo, hi = 1, 1  # the most trials whose halving fits: doubling, then bisection
        while hi < 10**7 and halving_hours(hi, self.rungs, self.eta, cost, spare=1) <= budget:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if halving_hours(mid, self.rungs, self.eta, cost, spare=1) <= budget else (lo, mid)
        n = lo
        counts = [c + (1 if r else 0) for r, c in enumerate(halving_counts(n, len(self.rungs), self.eta))]
        steps = [b - a for a, b in zip([0, *self.rungs[:-1]], self.rungs, strict=True)]
        parts = [c * st for c, st in zip(counts, steps, strict=True)]
        total = sum(parts)
        return [sum(parts[: i + 1]) / total for i in range(len(parts) - 1)] + [1.0]

    def spent_up_to(self, rung: int) -> float:
        """GPU-hours spent on epochs up to rung index ``rung`` (each trial at its own hours per epoch)."""
        top = self.rungs[rung]
        return float(
            self._cached(
                f"spent<={top}",
                lambda: sum(self.gpu_hours.get(t, 0.0) * min(e, top) / e for t, e in self.epochs.items() if e > 0),
            )
        )

    def reached(self, trial: str) -> int:
        """How many rungs a trial has recorded a result at (0 before the first)."""
        return max((i + 1 for i, recorded in self.results.items() if trial in recorded), default=0)

    def status(self, trial: str) -> str:
        """finalist, paused (waiting at a rung), promoted (continuing past one) or running."""
        if trial in self.finalists:
            return "finalist"
        if trial in self.paused:
            return "paused"
        if any(trial in promoted for promoted in self.promoted.values()):
            return "promoted"
        return "running"

    def ranked_finalists(self) -> list[str]:
        """The finalists, best first by their top-rung result (ties by name)."""
        top = self.results[len(self.rungs) - 1]
        return sorted(self.finalists, key=lambda t: (self._key(top.get(t, math.nan)), t))

    def rung_index(self, epoch: int) -> int | None:
        """The rung at this epoch, or None between rungs."""
        return self.rungs.index(epoch) if epoch in self.rungs else None

    def _key(self, value: float) -> float:
        if math.isnan(value):
            return math.inf  # a failed result ranks last
        return -value if self.mode == "max" else value

    def top(self, rung: int) -> set[str]:
        """The trials in the top ⌊n/η⌋ of a rung (empty until it holds ``min_results`` results)."""
        recorded = self.results[rung]
        if len(recorded) < self.min_results:
            return set()
        version = (id(recorded), len(recorded), self._writes[rung])
        cached = self._top.get(rung)
        if cached is None or cached[0] != version:
            k = len(recorded) // self.eta
            ranked = sorted(recorded, key=lambda t: (self._key(recorded[t]), t))
            cached = self._top[rung] = version, set(ranked[:k])
        return set(cached[1])

    # -- events -----------------------------------------------------------------------------------------

    def on_result(
        self, trial: str, epoch: int, value: float, gpu_hours: float | None = None, committed: Committed = 0.0
    ) -> Decision:
        """A trial finished ``epoch`` with metric ``value`` (and has used ``gpu_hours`` in total); ``committed``:
        the hours the other running trials still need to reach their next rungs (:meth:`affords`)."""
        if gpu_hours is not None:
            self.gpu_hours[trial] = gpu_hours
            self.epochs[trial] = max(int(epoch), self.epochs.get(trial, 0))
            self._hours_version += 1
        rung = self.rung_index(epoch)
        if rung is None:
            return Decision.CONTINUE
        self.results[rung][trial] = float(value)
        self._writes[rung] += 1
        if rung == len(self.rungs) - 1:
            if trial not in self.finalists:
                self.finalists.append(trial)
            return Decision.FINALIST
        if trial in self.promoted[rung]:  # a result it had (a restored trial reports its epoch again)
            return Decision.CONTINUE
        if trial in self.top(rung) and self.affords(self.hours_to_next_rung(trial, epoch), committed, rung + 1):
            self.promoted[rung].add(trial)
            return Decision.CONTINUE
        self.paused[trial] = rung
        return Decision.PAUSE

    def promotable(self, committed: Committed = 0.0) -> list[str]:
        """Paused trials that qualify now and that the budget affords one after another beside ``committed``
        (:meth:`affords`), highest rung first, best first. Pure: call :meth:`promote` to act."""
        chosen = []
        for t in self._qualifying():
            need = self.hours_to_next_rung(t, self.rungs[self.paused[t]])
            if self.affords(need, committed, self.paused[t] + 1):
                chosen.append(t)
                committed = _plus(committed, need, self.paused[t] + 1)
        return chosen

    def held_back(self) -> list[str]:
        """Paused trials that would be promoted now but for the budget, highest rung first, best first: what a
        reopened sweep with a larger budget continues (empty without a budget)."""
        affordable = set(self.promotable())
        return [t for t in self._qualifying() if t not in affordable]

    def _qualifying(self) -> list[str]:
        ready = []
        for rung in sorted({r for r in self.paused.values()}, reverse=True):
            recorded = self.results[rung]
            top = self.top(rung)
            waiting = [t for t, r in self.paused.items() if r == rung and t in top and t not in self.promoted[rung]]
            ready += sorted(waiting, key=lambda t: (self._key(recorded[t]), t))
        return ready

    def promote(self, trial: str) -> None:
        """Mark a paused trial promoted: it resumes from its checkpoint towards the next rung."""
        rung = self.paused.pop(trial)
        self.promoted[rung].add(trial)

    def close(self) -> list[str]:
        """No more results will arrive (the grid is exhausted and nothing runs): promote, per rung from the top,
        the paused trials in the top ⌊n/η⌋ (at least one per rung that has results and promoted nobody), so
        every rung keeps feeding the next, as far as the budget affords. Returns the trials promoted; the rest stay
        paused for good."""
        chosen = self.promotable()
        if not chosen:
            committed: Committed = 0.0
            for rung in sorted({r for r in self.paused.values()}, reverse=True):
                if self.promoted[rung]:
                    continue
                recorded = self.results[rung]
                waiting = sorted((t for t, r in self.paused.items() if r == rung), key=lambda t: self._key(recorded[t]))
                need = self.hours_to_next_rung(waiting[0], self.rungs[rung]) if waiting else math.nan
                if waiting and self.affords(need, committed, rung + 1):
                    chosen.append(waiting[0])
                    committed = _plus(committed, need, rung + 1)
        for t in chosen:
            self.promote(t)
        return chosen

    def add_rung(self, epochs: int) -> None:
        """Another rung above the top one (a finished sweep reopened): the finalists wait at the old top rung,
        compared like at any other rung, and its best 1/η go on to the new top rung."""
        if epochs <= self.rungs[-1]:
            raise ConfigError(f"The value of the new rung is {epochs}, but must be above the top rung {self.rungs[-1]}")
        self.rungs = [*self.rungs, int(epochs)]
        top = len(self.rungs) - 1
        self.results[top], self.promoted[top] = {}, set()
        for t in self.finalists:
            self.paused[t] = top - 1
        self.finalists = []

    # -- persistence ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "rungs": list(self.rungs),
            "eta": self.eta,
            "mode": self.mode,
            "min_results": self.min_results,
            "budget_gpu_hours": self.budget_gpu_hours,
            "results": {str(k): v for k, v in self.results.items()},
            "promoted": {str(k): sorted(v) for k, v in self.promoted.items()},
            "paused": dict(self.paused),
            "finalists": list(self.finalists),
            "gpu_hours": dict(self.gpu_hours),
            "epochs": dict(self.epochs),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Promoter:
        return Promoter(
            rungs=d["rungs"],
            eta=d["eta"],
            mode=d["mode"],
            min_results=d["min_results"],
            budget_gpu_hours=d["budget_gpu_hours"],
            results={int(k): dict(v) for k, v in d["results"].items()},
            promoted={int(k): set(v) for k, v in d["promoted"].items()},
            paused=dict(d["paused"]),
            finalists=list(d["finalists"]),
            gpu_hours=dict(d["gpu_hours"]),
            epochs={k: int(v) for k, v in d["epochs"].items()} if "epochs" in d else _epochs_reached(d),
        )


def _epochs_reached(d: dict[str, Any]) -> dict[str, int]:
    """Each trial's epochs as a promoter state saved without them has it: the highest rung it recorded a result at
    (it may have trained a few epochs beyond; those are then costed at that rung's rate)."""
    rungs = [int(r) for r in d["rungs"]]
    out: dict[str, int] = {}
    for rung, recorded in d["results"].items():
        for t in recorded:
            out[t] = max(out.get(t, 0), rungs[int(rung)])
    return {t: e for t, e in out.items() if t in d.get("gpu_hours", {})}

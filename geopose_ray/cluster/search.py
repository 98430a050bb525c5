"""The Ray Tune searcher of ``search: guided``: every grid point once, in the guided order, then the finalists'
fold runs.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ray.tune.search import Searcher

from geopose_ray.sweep.config import axis_columns
from geopose_ray.sweep.dispatch import State, TrialView, arch_costs, by_hours_left
from geopose_ray.sweep.order import GuidedOrder
from geopose_ray.sweep.records import EPOCH_HOURS, per_epoch_hours

GUIDED_AXES = ("encoder", "decoder", "lr", "accumulation")


class GuidedSearch(Searcher):
    """Every point of a grid exactly once, in a :class:`GuidedOrder` that learns from the first-rung scores (its
    levels: encoder, decoder, learning rate, accumulation and the grid's named ``axes``), then
    each finalist's runs on the other folds as soon as it is a finalist (with ``top_k``, a finalist that ranks within
    the best ``top_k`` finalists so far: so every one of the final best ``top_k`` that finished early has its runs
    early, and one that falls out of them later has had them too; the driver runs the rest at the end).

    Ray Tune asks for a trial whenever it has room for one more pending trial (the driver's ``pending_trials``);
    each answer is the grid point the order picks with what the first rung has shown by then. Once every grid
    point has started, the answers are the fold runs (``folds``: the other validation folds, trained to ``top``
    epochs) of the trials that have finished the top rung, in the dispatch policy's order (:func:`fold_queue`),
    each config carrying its finalist's hours per epoch (``_epoch_hours``). None means "nothing yet" (a finalist
    may still come); FINISHED once screening is over and every fold run has been handed out. Its state is pickled
    with the experiment, so a restarted driver goes on where it stopped.
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
        axes: Sequence[str] = (),
        top_k: int | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.top_k = top_k  # fold runs only for a finalist within the best top_k finalists when it finishes
        self.final: dict[str, float] = {}  # finalist -> its top-rung score (higher is better)
        levels = [
            {**p["model"], "lr": p["lr"], "accumulation": p["accumulation"], **axis_columns(p, axes)} for p in points
        ]
        self.order = GuidedOrder(levels, axes=[*GUIDED_AXES, *axes], seed=seed)
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
        # A trial that ends before the first rung errored (or the top rung is below it): the lowest rank. One that
        # never ran (stopped beyond the budget) says nothing of its levels.
        if error or result:
            self._observe(trial_id, None if error or not result else result.get(self.metric))
        self.ended.add(trial_id)
        if not error and result and self.top is not None and int(result.get("epoch", 0)) >= self.top:
            if not self._within_top_k(trial_id, result.get(self.metric)):
                return  # not among the best top_k finalists so far: the driver gives fold runs to those at the end
            point = self.points[self.index[trial_id]]
            self.cost[trial_id] = per_epoch_hours(result)
            self.queue += [
                {**point, "val_fold": k, "epochs": self.top, "_finalist": trial_id, EPOCH_HOURS: self.cost[trial_id]}
                for k in self.folds
            ]
            self.queue = fold_queue(self.queue)

    def _within_top_k(self, trial_id: str, value: Any) -> bool:
        """Record a finalist's top-rung score; whether it ranks within the best ``top_k`` finalists so far."""
        score = float(value) if isinstance(value, int | float) else math.nan
        score = score if self.mode == "max" else -score
        self.final[trial_id] = score if score == score else -math.inf
        if self.top_k is None:
            return True
        better = sum(1 for t, v in self.final.items() if t != trial_id and v > self.final[trial_id])
        return better < self.top_k

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self.__dict__.setdefault("cost", {})  # saved before fold runs were ordered by cost
        self.__dict__.setdefault("top_k", None)  # saved before fold runs went to the best top_k only
        self.__dict__.setdefault("final", {})


def fold_queue(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold-run configs not yet handed out, in the dispatch policy's order (its :func:`by_hours_left`)."""
    views = []
    for i, cfg in enumerate(configs):
        model = cfg.get("model") or {}
        arch = f"{model.get('encoder')}/{model.get('decoder')}"
        hours = float(cfg.get(EPOCH_HOURS, math.nan))
        views.append(TrialView(str(i), True, State.PENDING, 0, int(cfg.get("epochs", 0)), hours, arch))
    return [configs[int(v.key)] for v in by_hours_left(views, arch_costs(views))]


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

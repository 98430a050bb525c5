"""The budget planner: the sweep's own knobs searched on the simulator for a GPU-hour budget and a worker count.

For each candidate setting (rungs, η, ``fold_runs.top_k``, ``search``) it replays ``seeds`` populations of the
config's size (:func:`~geopose_ray.simulate.curves.draw_curves`: the simulator's fitted family, not the config's
own encoders) through the sweep's dispatch policy, then the ``top_k`` finalists' runs on the other folds, all
within the budget: the fold runs' GPU-hours (top_k × (K − 1) × top rung × the population's mean hours per epoch)
are set aside and screening gets the rest as its cap (``budget_gpu_hours``). A candidate is measured by the share
of seeds whose final pick (the best K-fold mean among the finalists with every fold run done) is within the
tolerance of the population's best, then by its mean regret, those whose median GPU-hours (fold runs included)
exceed the budget by more than 5 % after all others; its GPU-hours and wall-clock are the replay's.
The recommendation is the best candidate; it is written as a config (the input with the knobs replaced).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geopose_ray.errors import ConfigError
from geopose_ray.simulate.curves import PERSISTENT, draw_curves
from geopose_ray.simulate.engine import SweepPolicy, replay
from geopose_ray.simulate.measure import PENDING, TOLERANCE, fold_scores
from geopose_ray.simulate.measure import fold_pick as _fold_pick

# The rung schedules tried (all ending at the top rung; in epochs for a top rung of 200, scaled otherwise).
SCHEDULES: tuple[tuple[int, ...], ...] = (
    (20, 60, 200),
    (20, 40, 100, 200),
    (10, 30, 100, 200),
    (40, 200),
    (7, 22, 67, 200),
)
ETAS = (3, 4)
TOP_KS = (1, 2, 3, 5)
SEARCHES = ("grid", "guided")


@dataclass(frozen=True)
class Candidate:
    rungs: tuple[int, ...]
    eta: int
    top_k: int | None  # None: every finalist gets fold runs, and the budget caps screening alone
    search: str


@dataclass
class Measured:
    """A candidate over the seeds."""

    candidate: Candidate
    within: float  # share of seeds whose final K-fold pick is within the tolerance of the best
    regret: float  # mean regret of that pick (a seed with no pick counts the population's spread, best − median)
    gpu_hours: float  # median, screening and fold runs
    wall_h: float  # median hours to the last fold run's end
    screen_budget: float  # the screening cap that leaves room for the fold runs


def scaled(schedule: Sequence[int], top: int) -> tuple[int, ...]:
    """A schedule for a top rung of 200 scaled to ``top`` (distinct, increasing, ending at ``top``)."""
    out = sorted({max(1, round(r * top / 200)) for r in schedule[:-1]} | {top})
    return tuple(out)


def measure(
    candidate: Candidate,
    trials: int,
    workers: int,
    budget: float,
    seeds: Sequence[int],
    folds: int = 5,
    min_results: int = 9,
    tolerance: float = TOLERANCE,
    persistent: float = PERSISTENT,
) -> Measured | None:
    """``candidate`` on ``seeds``; None when the budget cannot even pay for its fold runs."""
    c = candidate
    hits, regrets, hours, walls = [], [], [], []
    screen_budget = math.nan
    for seed in seeds:
        curves = draw_curves(trials, seed, top=c.rungs[-1], persistent=persistent)
        k = 0 if c.top_k is None else min(c.top_k, trials)  # without top_k nothing is set aside: as configured
        screen_budget = budget - k * (folds - 1) * c.rungs[-1] * float(np.mean(curves.minutes)) / 60.0
        if screen_budget <= 0:
            return None
        order = [int(i) for i in np.random.default_rng(np.random.SeedSequence([seed, 11])).permutation(trials)]
        guided = c.search == "guided"
        policy = SweepPolicy(
            curves, order, c.rungs, c.eta, min_results, screen_budget, guided, PENDING, folds - 1,
            backfill=guided, top_k=c.top_k,
        )  # fmt: skip
        run = replay(curves, workers, policy, fold_runs=folds - 1)
        _, regret = _fold_pick(run, curves, folds, fold_scores(curves, folds - 1, seed))
        if regret is None:
            finite = curves.true_final[np.isfinite(curves.true_final)]
            regret = float(np.max(finite) - np.median(finite))
        hits.append(regret <= tolerance + 1e-12)
        regrets.append(regret)
        hours.append(run.gpu_hours)
        walls.append(run.makespan_h)
    return Measured(c, float(np.mean(hits)), float(np.mean(regrets)), float(np.median(hours)),
                    float(np.median(walls)), screen_budget)  # fmt: skip


def candidates(top: int) -> list[Candidate]:
    return [
        Candidate(scaled(s, top), eta, k, search)
        for s in SCHEDULES
        for eta in ETAS
        for k in TOP_KS
        for search in SEARCHES
    ]


def plan(
    trials: int,
    workers: int,
    budget: float,
    seeds: int = 10,
    top: int = 200,
    folds: int = 5,
    min_results: int = 9,
    tolerance: float = TOLERANCE,
    keep: int = 6,
) -> list[Measured]:
    """Every candidate on ``seeds`` seeds, then the ``keep`` best again on as many fresh seeds (so the pick's
    figure is not the maximum of noisy estimates); best first. Raises ConfigError if none fits the budget."""
    if budget <= 0:
        raise ConfigError(f"The value of `budget` is {budget}, but must be a positive number of GPU-hours")
    first = [m for c in candidates(top) if (m := measure(c, trials, workers, budget, range(seeds), folds,
                                                          min_results, tolerance)) is not None]  # fmt: skip
    if not first:
        raise ConfigError(f"a budget of {budget:g} GPU-hours cannot pay for even one finalist's fold runs")
    first.sort(key=lambda m: _rank(m, budget))
    fresh = range(1000, 1000 + seeds)
    again = [m for m in (measure(x.candidate, trials, workers, budget, fresh, folds, min_results, tolerance)
                         for x in first[:keep]) if m is not None]  # fmt: skip
    again.sort(key=lambda m: _rank(m, budget))
    if not again:
        raise ConfigError(f"a budget of {budget:g} GPU-hours cannot pay for the best candidates' fold runs")
    return again


OVER = 1.05  # a candidate whose median GPU-hours exceed the budget by more than this factor ranks after the rest


def _rank(m: Measured, budget: float) -> tuple[bool, float, float, float]:
    """Within the budget (its median GPU-hours, fold runs included) first; then the share of seeds within the
    tolerance, the mean regret, the GPU-hours."""
    return m.gpu_hours > OVER * budget, -m.within, m.regret, m.gpu_hours


def format_plan(measured: list[Measured], budget: float, workers: int, tolerance: float = TOLERANCE) -> str:
    lines = [
        f"budget {budget:,.0f} GPU-hours on {workers} workers; the best settings (fresh seeds):",
        f"| rungs | eta | top_k | search | pick within {tolerance:g} | mean regret | GPU-hours | wall-clock h "
        "| screening cap |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in measured:
        c = m.candidate
        lines.append(
            f"| {','.join(map(str, c.rungs))} | {c.eta} | {c.top_k} | {c.search} | {m.within:.0%} | {m.regret:.4f} | "
            f"{m.gpu_hours:,.0f} | {m.wall_h:,.0f} | {m.screen_budget:,.0f} |"
        )
    return "\n".join(lines)

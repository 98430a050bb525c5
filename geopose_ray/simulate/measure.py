"""Run every policy on the same curves, seed after seed, and measure them against what only the simulator knows.

Per policy and seed:
- ``gpu_hours``: busy worker-time; ``makespan_h``: hours until the last worker stops; ``utilisation``:
  gpu_hours / (workers × makespan_h).
- ``regret``: the best true final score of the population minus the true final score of the finalist a user
  would pick: the best *observed* ``score_avg`` at the top rung (:func:`pick_scores`, the mean of the last
  epochs' scores, as the results table ranks). ``best_found``: the true best reached the top rung.
- ``hours_to_near_best``: GPU-hours spent when the pick (the incumbent, as finalists arrive) first came within
  :data:`TOLERANCE` of the best; None if never.
- ``regret_by_best_score``: the regret had the pick been the finalist with the best score at any epoch (the
  trainer's ``best_score``, a maximum over noisy epochs), not at the top rung; ``regret_by_last_score``: had it
  been the best score of the top rung's epoch alone.
- ``regret_at_budget``: the regret of the pick when the policy had spent the matched budget B (or at its end if
  it spent less). B is ``--budget`` when given, else the promoter's own GPU-hours on that seed; random search
  is given B as its budget. This is the "same budget" comparison: every policy stopped at the same GPU-hours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from geopose_ray.errors import ConfigError
from geopose_ray.metrics import window_epochs
from geopose_ray.simulate.curves import PERSISTENT, Curves, draw_curves
from geopose_ray.simulate.engine import (
    AshaPolicy,
    GridPolicy,
    Policy,
    RandomPolicy,
    Run,
    SweepPolicy,
    replay,
)
from geopose_ray.sweep.promoter import Promoter

TOLERANCE = 0.002  # "within 0.002 of the best"
GRID_SHARE = 0.20  # the target: near the best with at most this share of the grid's GPU-hours
GUIDED = "promoter, guided order"
GUIDED_ASHA = "asha, guided order"
POLICIES = ("grid", "promoter", GUIDED, "asha", GUIDED_ASHA, "random")
PENDING = 16  # the driver's default pending_trials: how far ahead a guided order decides


@dataclass
class Outcome:
    """One policy on one seed."""

    policy: str
    gpu_hours: float
    makespan_h: float
    utilisation: float
    autoscaled_utilisation: float
    regret: float | None  # None: no finalist
    best_found: bool
    hours_to_near_best: float | None
    hours_to_near_finalist: float | None  # GPU-hours when some finalist (not the pick) first was within TOLERANCE
    regret_by_best_score: float | None  # the final pick's regret were finalists ranked by their best epoch's score
    regret_by_last_score: float | None  # … were they ranked by the last epoch's score alone, not score_avg
    regret_at_budget: float | None
    finalists: int
    anytime: list[tuple[float, float]] = field(default_factory=list)  # (GPU-hours, regret) at each new pick


def pick_scores(curves: Curves) -> np.ndarray:
    """(n,) what the results table ranks finalists by: each trial's ``score_avg`` at the top rung, the mean of
    its last :func:`window_epochs` scores (NaN for a trial that errored before the top rung)."""
    k = window_epochs(curves.top)
    return np.asarray(curves.observed[:, curves.top - k :].mean(axis=1))


def evaluate(run: Run, curves: Curves, budget: float, tolerance: float = TOLERANCE) -> Outcome:
    """Score a replay against the true finals (see the module docstring); "near" is within ``tolerance``."""
    best = float(np.nanmax(curves.true_final))
    ranked = pick_scores(curves)
    best_trial = int(np.nanargmax(curves.true_final))
    pick, pick_obs = -1, -math.inf
    near: float | None = None
    near_finalist: float | None = None
    at_budget: float | None = None
    anytime: list[tuple[float, float]] = []
    for _, spent, trial in run.finishes:
        if near_finalist is None and best - float(curves.true_final[trial]) <= tolerance + 1e-12:
            near_finalist = spent
        obs = float(ranked[trial])
        if obs > pick_obs:
            pick, pick_obs = trial, obs
            regret = best - float(curves.true_final[pick])
            anytime.append((spent, regret))
            if near is None and regret <= tolerance + 1e-12:
                near = spent
        if spent <= budget * (1 + 1e-9) and pick >= 0:
            at_budget = best - float(curves.true_final[pick])
    finalists = {t for _, _, t in run.finishes}
    by_max = max(finalists, key=lambda t: float(np.nanmax(curves.observed[t])), default=None)
    by_last = max(finalists, key=lambda t: float(curves.observed[t, curves.top - 1]), default=None)
    return Outcome(
        policy=run.policy,
        gpu_hours=run.gpu_hours,
        makespan_h=run.makespan_h,
        utilisation=run.utilisation,
        autoscaled_utilisation=run.autoscaled_utilisation,
        regret=best - float(curves.true_final[pick]) if pick >= 0 else None,
        best_found=best_trial in finalists,
        hours_to_near_best=near,
        hours_to_near_finalist=near_finalist,
        regret_by_best_score=None if by_max is None else best - float(curves.true_final[by_max]),
        regret_by_last_score=None if by_last is None else best - float(curves.true_final[by_last]),
        regret_at_budget=at_budget,
        finalists=len(finalists),
        anytime=anytime,
    )


def simulate_seed(
    seed: int,
    trials: int = 240,
    workers: int = 16,
    rungs: Sequence[int] = (20, 60, 200),
    eta: int = 3,
    min_results: int = 9,
    budget: float | None = None,
    persistent: float = PERSISTENT,
) -> tuple[Curves, dict[str, Outcome]]:
    """Every policy on one seed's population, all seeing the same curves and the same arrival order."""
    curves = draw_curves(trials, seed, top=int(rungs[-1]), persistent=persistent)
    return curves, run_policies(curves, seed, workers, rungs, eta, min_results, budget)


def run_policies(
    curves: Curves,
    seed: int,
    workers: int = 16,
    rungs: Sequence[int] = (20, 60, 200),
    eta: int = 3,
    min_results: int = 9,
    budget: float | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Outcome]:
    """Every policy on ``curves``, all in the same arrival order, drawn from ``seed``."""
    trials = len(curves)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    order = [int(i) for i in rng.permutation(trials)]  # a grid's order says nothing about quality
    random_order = [int(i) for i in rng.permutation(trials)]

    def promoter(guided: bool = False) -> Run:
        policy = SweepPolicy(curves, order, rungs, eta, min_results, budget, guided, PENDING)
        return replay(curves, workers, policy)

    runs = {"promoter": promoter(), GUIDED: promoter(guided=True)}
    matched = budget if budget is not None else runs["promoter"].gpu_hours
    matched_guided = budget if budget is not None else runs[GUIDED].gpu_hours
    others: list[Policy] = [
        GridPolicy(curves, order),
        AshaPolicy(curves, order, rungs, eta),
        AshaPolicy(curves, order, rungs, eta, guided=True, lag=PENDING),
        RandomPolicy(curves, random_order, matched),
    ]
    for policy in others:
        runs[policy.name] = replay(curves, workers, policy)
    # The guided pair is compared at the guided promoter's GPU-hours, the rest at the promoter's.
    return {
        name: evaluate(runs[name], curves, matched_guided if name in (GUIDED, GUIDED_ASHA) else matched, tolerance)
        for name in POLICIES
    }


def _inf(v: float | None) -> float:
    return math.inf if v is None else v


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median and the 10th/90th percentiles (nearest observed values); None stands for never/none = +inf."""
    x = np.array([math.inf if v is None else v for v in values], dtype=float)
    out = {
        "median": float(np.median(x)),
        "p10": float(np.percentile(x, 10, method="lower")),
        "p90": float(np.percentile(x, 90, method="higher")),
        "mean": float(np.mean(x)),
    }
    return {k: (None if math.isinf(v) or math.isnan(v) else v) for k, v in out.items()}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (95 % by default): how far a rate over n seeds can be from
    the rate over all seeds."""
    if n < 1:
        raise ConfigError("A rate needs at least one seed")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _targets(
    policies: dict[str, dict[str, Any]], per_seed: list[dict[str, Outcome]], promoter: str, asha: str
) -> dict[str, Any]:
    """The targets for one promoter row, against ASHA with the same arrival order, with 95 % intervals
    over seeds: Wilson's for the rate, a paired normal one for the mean regret difference (seeds where either
    policy had no pick at B are left out of the difference)."""
    p = policies[promoter]
    pairs = [(_inf(o[promoter].regret_at_budget), _inf(o[asha].regret_at_budget)) for o in per_seed]
    diffs = np.array([x - y for x, y in pairs if math.isfinite(x) and math.isfinite(y)])
    half = 1.96 * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    mean_diff = float(np.mean(diffs)) if len(diffs) else math.nan
    hits = round(p["near_best_within_share_rate"] * len(per_seed))
    return {
        "near_best_in_90pct_of_seeds_within_20pct_of_grid": p["near_best_within_share_rate"] >= 0.9,
        "near_best_within_share_rate_ci95": list(wilson(hits, len(per_seed))),
        "regret_difference_vs_asha": mean_diff,  # promoter − ASHA, mean over seeds: < 0 is better
        "regret_difference_vs_asha_ci95": [mean_diff - half, mean_diff + half],
        "lower_regret_than_asha_at_same_budget": float(np.mean([x for x, _ in pairs]))
        < float(np.mean([y for _, y in pairs])),
        "promoter_vs_asha_seeds_won_lost": [sum(x < y - 1e-12 for x, y in pairs), sum(y < x - 1e-12 for x, y in pairs)],
        "mean_regret_at_budget": [float(np.mean([x for x, _ in pairs])), float(np.mean([y for _, y in pairs]))],
        "utilisation_at_least_95pct": (p["utilisation"]["median"] or 0.0) >= 0.95,
        "autoscaled_utilisation_at_least_95pct": (p["autoscaled_utilisation"]["median"] or 0.0) >= 0.95,
    }


def simulate(
    trials: int = 240,
    workers: int = 16,
    seeds: int = 50,
    budget: float | None = None,
    rungs: Sequence[int] = (20, 60, 200),
    eta: int = 3,
    min_results: int = 9,
    first_seed: int = 0,
    keep_outcomes: bool = False,
    persistent: float = PERSISTENT,
) -> dict[str, Any]:
    """Every policy on ``seeds`` populations; per policy the median and spread of each measure, the rates, and
    whether the targets hold for the promoter. JSON-ready (None for never)."""
    if seeds < 1:
        raise ConfigError(f"The value of `seeds` is {seeds}, but must be `seeds >= 1`")
    if budget is not None and budget <= 0:
        raise ConfigError(f"The value of `budget` is {budget}, but must be a positive number of GPU-hours")
    Promoter(rungs, eta, "max", min_results, budget)  # validates rungs, η and min_results before any work
    started = time.perf_counter()
    per_seed = [
        simulate_seed(s, trials, workers, rungs, eta, min_results, budget, persistent)[1]
        for s in range(first_seed, first_seed + seeds)
    ]
    policies: dict[str, dict[str, Any]] = {}
    for name in POLICIES:
        rows = [o[name] for o in per_seed]
        grid_hours = [o["grid"].gpu_hours for o in per_seed]
        share = [
            None if r.hours_to_near_best is None else r.hours_to_near_best / g
            for r, g in zip(rows, grid_hours, strict=True)
        ]
        policies[name] = {
            "gpu_hours": _spread([r.gpu_hours for r in rows]),
            "grid_share": _spread([r.gpu_hours / g for r, g in zip(rows, grid_hours, strict=True)]),
            "makespan_h": _spread([r.makespan_h for r in rows]),
            "utilisation": _spread([r.utilisation for r in rows]),
            "autoscaled_utilisation": _spread([r.autoscaled_utilisation for r in rows]),
            "regret": _spread([r.regret for r in rows]),
            "regret_at_budget": _spread([r.regret_at_budget for r in rows]),
            "regret_by_best_score": _spread([r.regret_by_best_score for r in rows]),
            "regret_by_last_score": _spread([r.regret_by_last_score for r in rows]),
            "hours_to_near_best": _spread([r.hours_to_near_best for r in rows]),
            "grid_share_to_near_best": _spread(share),
            "finalists": _spread([r.finalists for r in rows]),
            "best_found_rate": float(np.mean([r.best_found for r in rows])),
            "near_best_rate": float(np.mean([s is not None for s in share])),
            "near_best_within_share_rate": float(np.mean([s is not None and s <= GRID_SHARE for s in share])),
            "near_finalist_within_share_rate": float(
                np.mean(
                    [
                        r.hours_to_near_finalist is not None and r.hours_to_near_finalist <= GRID_SHARE * g
                        for r, g in zip(rows, grid_hours, strict=True)
                    ]
                )
            ),
        }
    targets = {
        "promoter": _targets(policies, per_seed, "promoter", "asha"),
        GUIDED: _targets(policies, per_seed, GUIDED, GUIDED_ASHA),
    }
    out: dict[str, Any] = {
        "config": {
            "trials": trials,
            "workers": workers,
            "seeds": seeds,
            "first_seed": first_seed,
            "budget": budget,
            "rungs": list(rungs),
            "eta": eta,
            "min_results": min_results,
            "tolerance": TOLERANCE,
            "persistent": persistent,
            "window": window_epochs(int(rungs[-1])),
        },
        "policies": policies,
        "targets": targets,
        "seconds": time.perf_counter() - started,
    }
    if keep_outcomes:
        out["outcomes"] = [{k: asdict(v) for k, v in o.items()} for o in per_seed]
    return out


def grid_gpu_hours(curves: Curves) -> float:
    """GPU-hours of the full grid: every trial trained to the top rung, or until the epoch it errors in."""
    return float(np.sum(curves.minutes * np.minimum(curves.top, curves.fail_epoch)) / 60.0)


def fold_scores(curves: Curves, runs: int, seed: int) -> np.ndarray:
    """(n, runs): each trial's ``score_avg`` at the top rung on each of its other folds: its true final score
    plus that run's own deviation and the mean of its last epochs' wobble (the screening fold's sd and split,
    independent across folds)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    noise = np.asarray(curves.noise)[:, None]
    p, k = curves.persistent, window_epochs(curves.top)
    own, wobble = rng.standard_normal((2, len(curves), runs))
    return curves.true_final[:, None] + noise * (math.sqrt(p) * own + math.sqrt((1 - p) / k) * wobble)


def fold_pick(run: Run, curves: Curves, folds: int, scores: np.ndarray) -> tuple[float | None, float | None]:
    """The pick the design makes after the fold stage: among the finalists whose K − 1 fold runs have all ended,
    the one with the best mean over its K folds (its screening ``score_avg`` at the top rung and its fold runs'
    ``scores``). Returns the GPU-hours spent when that pick first came within :data:`TOLERANCE` of the best
    (None: never) and the regret of the last pick (None: no finalist completed its folds)."""
    n, runs = len(curves), folds - 1
    best = float(np.nanmax(curves.true_final))
    screened = pick_scores(curves)
    done: dict[int, int] = {}
    pick_mean, regret, near = -math.inf, None, None
    for _, spent, job in run.fold_finishes:
        trial = (job - n) // runs
        done[trial] = done.get(trial, 0) + 1
        if done[trial] < runs:
            continue
        mean = (float(screened[trial]) + float(scores[trial].sum())) / folds
        if mean > pick_mean:
            pick_mean, regret = mean, best - float(curves.true_final[trial])
            if near is None and regret <= TOLERANCE + 1e-12:
                near = spent
    return near, regret


def fold_pipeline(
    trials: int = 240,
    workers: int = 16,
    seeds: int = 10,
    folds: int = 5,
    rungs: Sequence[int] = (20, 60, 200),
    eta: int = 3,
    min_results: int = 9,
    first_seed: int = 0,
    persistent: float = PERSISTENT,
) -> dict[str, dict[str, Any]]:
    """The sweep's dispatch policy (:class:`~geopose_ray.simulate.engine.SweepPolicy`) followed by its finalists'
    runs on the other ``folds − 1`` folds: started after screening (``search: grid``: a second Tuner), or
    backfilling idle workers during it (in the listed order, and with ``search: guided``; and guided with fold runs
    pre-empted by costlier ones, the guided driver's default).
    Per variant: utilisation while screening, screening hours, hours and
    utilisation of the whole pipeline, fold-run GPU-hours, the regret of the screening pick, and the pick after
    the fold stage (:func:`fold_pick`): its regret, and whether it came within :data:`TOLERANCE` of the best by
    :data:`GRID_SHARE` of the grid's GPU-hours, fold runs counted."""
    rows: dict[str, list[dict[str, float | None]]] = {}
    for seed in range(first_seed, first_seed + seeds):
        curves = draw_curves(trials, seed, top=int(rungs[-1]), persistent=persistent)
        order = [int(i) for i in np.random.default_rng(np.random.SeedSequence([seed, 11])).permutation(trials)]
        scores = fold_scores(curves, folds - 1, seed)
        grid = grid_gpu_hours(curves)
        for guided, backfill, preempt in (
            (False, False, False),
            (False, True, False),
            (True, True, False),
            (True, True, True),
        ):
            policy = SweepPolicy(
                curves, order, rungs, eta, min_results, None, guided, PENDING, folds - 1, backfill, preempt
            )
            run = replay(curves, workers, policy, fold_runs=folds - 1)
            near, regret = fold_pick(run, curves, folds, scores)
            rows.setdefault(policy.name, []).append(
                {
                    "screen_utilisation": run.screen_utilisation,
                    "screen_h": run.screen_h,
                    "pipeline_h": run.makespan_h,
                    "pipeline_utilisation": run.utilisation,
                    "fold_gpu_hours": run.fold_gpu_hours,
                    "fold_restarts": float(run.fold_restarts),
                    "regret": evaluate(run, curves, math.inf).regret,
                    "fold_pick_regret": regret,
                    "fold_pick_near_by_share": float(near is not None and near <= GRID_SHARE * grid),
                    "fold_pick_share_to_near": None if near is None else near / grid,
                }
            )
    out: dict[str, dict[str, Any]] = {}
    for name, rs in rows.items():
        out[name] = {k: _spread([r[k] for r in rs]) for k in rs[0] if k != "fold_pick_near_by_share"}
        hits = [bool(r["fold_pick_near_by_share"]) for r in rs]
        out[name]["fold_pick_near_by_share_rate"] = float(np.mean(hits))
        out[name]["fold_pick_near_by_share_ci95"] = list(wilson(sum(hits), len(hits)))
    return out


def format_spread(s: dict[str, float | None], fmt: str, scale: float = 1.0) -> str:
    """A :func:`_spread` as "median (p10–p90)", each value times ``scale``; "never" for a value never reached."""

    def one(v: float | None) -> str:
        return "never" if v is None else format(v * scale, fmt)

    return f"{one(s['median'])} ({one(s['p10'])}–{one(s['p90'])})"


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: median (10th–90th percentile) over seeds, one row per policy."""
    c = result["config"]
    head = (
        "| policy | GPU-hours | % of grid | makespan h | utilisation % | autoscaled utilisation % | regret "
        "| regret at B | regret, last epoch's score | best among "
        "finalists | GPU-hours to within 0.002 (% of grid) | within 0.002 by 20 % of grid | a finalist within "
        "0.002 by 20 % | finalists |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for name, p in result["policies"].items():
        lines.append(
            f"| {name} | {format_spread(p['gpu_hours'], '.0f')} | {format_spread(p['grid_share'], '.1f', 100)} | "
            f"{format_spread(p['makespan_h'], '.0f')} | {format_spread(p['utilisation'], '.1f', 100)} | "
            f"{format_spread(p['autoscaled_utilisation'], '.1f', 100)} | {format_spread(p['regret'], '.4f')} | "
            f"{format_spread(p['regret_at_budget'], '.4f')} | {format_spread(p['regret_by_last_score'], '.4f')} | "
            f"{p['best_found_rate']:.0%} | "
            f"{format_spread(p['grid_share_to_near_best'], '.1f', 100)} | {p['near_best_within_share_rate']:.0%} | "
            f"{p['near_finalist_within_share_rate']:.0%} | "
            f"{format_spread(p['finalists'], '.0f')} |"
        )
    budget = (
        f"{c['budget']:g} GPU-hours"
        if c["budget"] is not None
        else "the promoter's GPU-hours on each seed (the guided pair: the guided promoter's)"
    )
    lines += [
        "",
        f"{c['trials']} trials, {c['workers']} workers, {c['seeds']} seeds, rungs {c['rungs']}, η {c['eta']}, "
        f"min_results {c['min_results']}; B = {budget}; noise {c['persistent']:g} persistent; finalists picked by "
        f"the mean of their last {c['window']} epochs' scores; {result['seconds']:.1f} s.",
    ]
    for name, t in result["targets"].items():
        won, lost = t["promoter_vs_asha_seeds_won_lost"]
        mine, asha = t["mean_regret_at_budget"]
        lo, hi = t["near_best_within_share_rate_ci95"]
        dlo, dhi = t["regret_difference_vs_asha_ci95"]
        lines.append(
            f"Targets ({name}): within 0.002 by 20 % of the grid in ≥ 90 % of seeds: "
            f"{'met' if t['near_best_in_90pct_of_seeds_within_20pct_of_grid'] else 'NOT met'} "
            f"({result['policies'][name]['near_best_within_share_rate']:.0%}, 95 % interval {lo:.0%}–{hi:.0%}; "
            f"a finalist within 0.002: {result['policies'][name]['near_finalist_within_share_rate']:.0%}); "
            f"lower mean regret at B than ASHA with the same order: "
            f"{'met' if t['lower_regret_than_asha_at_same_budget'] else 'NOT met'} "
            f"({mine:.4f} vs {asha:.4f}, difference 95 % interval {dlo:+.5f} to {dhi:+.5f}; lower on {won} seeds, "
            f"higher on {lost}); "
            f"utilisation ≥ 95 %: {'met' if t['utilisation_at_least_95pct'] else 'NOT met'} on a fixed pool, "
            f"{'met' if t['autoscaled_utilisation_at_least_95pct'] else 'NOT met'} on an autoscaling one."
        )
    return "\n".join(lines)

"""The promoter's rules on fabricated learning curves; no Ray, no training."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from geopose_ray.errors import ConfigError
from geopose_ray.sweep.promoter import Decision, Promoter

Curve = Callable[[int], float]


def run_sweep(p: Promoter, curves: dict[str, Curve], order: list[str]) -> list[tuple[str, int]]:
    """One worker: new trials in ``order``, each promoted trial resumed as soon as it qualifies; at the end the
    rungs are closed. Returns every (trial, epoch) trained, to check nothing is trained twice."""
    trained: list[tuple[str, int]] = []
    progress = dict.fromkeys(curves, 0)

    def train(trial: str) -> None:
        while True:
            progress[trial] += 1
            epoch = progress[trial]
            trained.append((trial, epoch))
            decision = p.on_result(trial, epoch, curves[trial](epoch), gpu_hours=epoch * 0.1)
            if decision is not Decision.CONTINUE:
                return

    pending = list(order)
    while True:
        ready = p.promotable()
        if ready:
            p.promote(ready[0])
            train(ready[0])
        elif pending:
            train(pending.pop(0))
        elif p.close():
            continue
        else:
            return trained


def stop_based_asha_finalists(rungs: list[int], eta: int, curves: dict[str, Curve], order: list[str]) -> set[str]:
    """Ray's AsyncHyperBand semantics: a trial below the rung's cut-off when it arrives is stopped for good."""
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    finalists = set()
    for trial in order:
        for i, rung in enumerate(rungs):
            value = curves[trial](rung)
            recorded[rung].append(value)
            if i == len(rungs) - 1:
                finalists.add(trial)
                break
            ranked = sorted(recorded[rung], reverse=True)
            cutoff = ranked[max(0, len(ranked) // eta - 1)] if len(ranked) >= eta else math.inf
            if value < cutoff:
                break
    return finalists


def plateau(final: float, speed: float = 1.0) -> Curve:
    return lambda e: final * (1 - math.exp(-speed * e))


def test_top_third_continues_the_rest_pause() -> None:
    p = Promoter(rungs=(2, 4), eta=3)
    assert p.on_result("a", 1, 0.9) is Decision.CONTINUE  # between rungs
    assert p.on_result("a", 2, 0.5) is Decision.PAUSE  # 1 result: top ⌊1/3⌋ is empty
    assert p.on_result("b", 2, 0.6) is Decision.PAUSE
    assert p.on_result("c", 2, 0.7) is Decision.CONTINUE  # 3 results: c is the top one
    assert p.promotable() == []
    assert p.on_result("c", 4, 0.8) is Decision.FINALIST
    assert p.finalists == ["c"]


def test_a_paused_trial_is_promoted_once_the_rung_fills() -> None:
    p = Promoter(rungs=(2, 4), eta=3)
    p.on_result("a", 2, 0.9)
    p.on_result("b", 2, 0.1)
    assert p.promotable() == []
    p.on_result("c", 2, 0.2)  # now n=3: a is in the top 1
    assert p.promotable() == ["a"]
    p.promote("a")
    assert p.promotable() == [] and "a" not in p.paused
    for t, v in [("d", 0.3), ("e", 0.05), ("f", 0.15)]:
        p.on_result(t, 2, v)
    assert p.promotable() == ["d"]  # n=6: top 2 = a (already promoted) and d


def test_late_bloomer_is_kept_where_stop_based_asha_kills_it() -> None:
    """L arrives early at rung 1 with a middling score; stop-based ASHA stops it, the promoter pauses it and
    promotes it once weaker trials fill the rung; L then wins the top rung."""
    curves: dict[str, Curve] = {
        "A": plateau(0.70, 1.0),
        "L": lambda e: 0.50 if e <= 2 else min(0.95, 0.5 + 0.1 * e),  # slow start, best at the end
        "B": plateau(0.60, 1.0),
        "C": plateau(0.30),
        "D": plateau(0.25),
        "E": plateau(0.20),
        "F": plateau(0.15),
        "G": plateau(0.10),
        "H": plateau(0.05),
    }
    order = ["A", "L", "B", "C", "D", "E", "F", "G", "H"]
    rungs = [2, 6, 18]
    asha = stop_based_asha_finalists(rungs, 3, curves, order)
    assert "L" not in asha
    p = Promoter(rungs=rungs, eta=3)
    trained = run_sweep(p, curves, order)
    assert "L" in p.finalists
    best = max(p.results[2], key=p.results[2].get)  # type: ignore[arg-type]
    assert best == "L"
    assert len(trained) == len(set(trained))  # no epoch trained twice: resumed, not restarted


def test_no_epoch_is_trained_twice_and_budget_is_a_fraction_of_the_grid() -> None:
    curves = {f"t{i:02d}": plateau(0.3 + 0.02 * i, 0.3 + 0.05 * (i % 5)) for i in range(27)}
    order = list(curves)
    random.Random(0).shuffle(order)  # a grid's order says nothing about quality
    p = Promoter(rungs=(3, 9, 27), eta=3)
    trained = run_sweep(p, curves, order)
    assert len(trained) == len(set(trained))
    full_grid = 27 * 27
    assert len(trained) < 0.35 * full_grid
    # Successive halving shape: 27 at rung 0, about 9 reach rung 1, about 3 reach the top.
    assert len(p.results[0]) == 27 and 6 <= len(p.results[1]) <= 12 and 1 <= len(p.finalists) <= 6
    assert max(curves, key=lambda t: curves[t](27)) in p.finalists  # the true best is found


def test_min_results_holds_everyone_until_the_rung_has_enough() -> None:
    p = Promoter(rungs=(2, 4), eta=2, min_results=4)
    for t, v in [("a", 0.9), ("b", 0.8), ("c", 0.1)]:
        assert p.on_result(t, 2, v) is Decision.PAUSE
    assert p.promotable() == []
    p.on_result("d", 2, 0.2)
    assert p.promotable() == ["a", "b"]


def test_mode_min_and_failed_results() -> None:
    p = Promoter(rungs=(1, 2), eta=2, mode="min")
    assert p.on_result("nan", 1, float("nan")) is Decision.PAUSE
    assert p.on_result("low", 1, 0.1) is Decision.CONTINUE  # lower is better; a NaN result ranks last
    assert p.on_result("high", 1, 5.0) is Decision.PAUSE
    assert p.on_result("mid", 1, 1.0) is Decision.CONTINUE  # top 2 of 4: low and mid
    assert p.promotable() == [] and set(p.paused) == {"nan", "high"}


def test_budget_stops_promotions() -> None:
    p = Promoter(rungs=(1, 2), eta=2, budget_gpu_hours=1.0)
    assert p.on_result("a", 1, 0.1, gpu_hours=0.6) is Decision.PAUSE
    assert p.on_result("b", 1, 0.9, gpu_hours=0.6) is Decision.PAUSE  # 1.2 h spent: b would have continued
    assert p.promotable() == [] and p.close() == []
    assert p.spent_gpu_hours == pytest.approx(1.2)
    assert p.held_back() == ["b"]  # what a larger budget would continue: the top half of rung 1
    p.budget_gpu_hours = 5.0
    assert p.held_back() == [] and p.promotable() == ["b"]


def test_close_promotes_the_best_waiting_trial_of_a_starved_rung() -> None:
    p = Promoter(rungs=(1, 2, 3), eta=3)
    p.on_result("a", 1, 0.4)
    p.on_result("b", 1, 0.6)
    assert p.promotable() == []  # two results: ⌊2/3⌋ = 0
    assert p.close() == ["b"]
    assert p.paused == {"a": 0}


def test_state_round_trips() -> None:
    p = Promoter(rungs=(2, 4, 8), eta=3, min_results=2, budget_gpu_hours=10.0)
    for t, v in [("a", 0.1), ("b", 0.5), ("c", 0.3), ("d", 0.9)]:
        p.on_result(t, 2, v, gpu_hours=0.5)
    q = Promoter.from_dict(p.to_dict())
    assert q == p and q.promotable() == p.promotable()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rungs": (20, 10)}, "strictly increasing"),
        ({"rungs": ()}, "positive epochs"),
        ({"eta": 1}, "`eta` is 1, but must be `eta >= 2`"),
        ({"mode": "best"}, "'max' or 'min'"),
        ({"min_results": 0}, "min_results >= 1"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Promoter(**kwargs)  # type: ignore[arg-type]


def test_a_reopened_sweep_with_another_rung_sends_the_best_finalists_on_without_retraining() -> None:
    curves: dict[str, Curve] = {f"t{i}": (lambda e, i=i: i + 0.01 * e) for i in range(9)}
    p = Promoter(rungs=[1, 2], eta=3)
    first = run_sweep(p, curves, list(curves))
    old_finalists = set(p.finalists)
    assert {"t8"} <= old_finalists and len(old_finalists) >= 3  # t8 ranks first at rung 1; close() adds others
    p = Promoter.from_dict(p.to_dict())  # as promote.py reloads it
    p.add_rung(4)
    assert p.rungs == [1, 2, 4] and not p.finalists and set(p.paused) >= old_finalists
    ready = p.promotable()
    k = len(old_finalists) // 3
    assert ready == sorted(old_finalists, key=lambda t: -curves[t](2))[:k]  # the top 1/η of the old top rung
    # Continue from each trial's last epoch: nothing is trained twice across the two runs.
    progress = {t: max(e for s, e in first if s == t) for t in curves}
    trained = list(first)
    for t in ready:
        p.promote(t)
        for epoch in range(progress[t] + 1, 5):
            trained.append((t, epoch))
            p.on_result(t, epoch, curves[t](epoch))
    assert len(trained) == len(set(trained))
    assert p.finalists == ready
    with pytest.raises(ConfigError, match="above the top rung 4"):
        p.add_rung(3)


def test_a_result_reported_again_gets_the_same_decision() -> None:
    """A restored trial reports an epoch it had reported (train_trial's replay): the promoter decides as before,
    and a trial it let continue past a rung is not paused there the second time."""
    p = Promoter([1, 3], eta=2, mode="max", min_results=2)
    assert p.on_result("a", 1, 0.5) is Decision.PAUSE  # too few results at the rung yet
    assert p.on_result("b", 1, 0.9) is Decision.CONTINUE  # the best of two: promoted on arrival
    assert p.on_result("b", 1, 0.9) is Decision.CONTINUE
    assert p.on_result("a", 1, 0.5) is Decision.PAUSE
    assert p.paused == {"a": 0} and p.promoted[0] == {"b"} and p.promotable() == []
    assert p.on_result("b", 3, 0.95) is Decision.FINALIST
    assert p.on_result("b", 3, 0.95) is Decision.FINALIST
    assert p.finalists == ["b"]

"""The sweep's dispatch policy on plain values: which trial a free worker takes, and when a fold run yields."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from geopose_ray.sweep.dispatch import PREEMPT_AFTER_S, Dispatch, Kind, Pick, State, TrialView
from geopose_ray.sweep.promoter import Decision, Promoter


def fold(key: str, state: State, cost: float = math.nan, decoder: str = "Unet", epoch: int = 0) -> TrialView:
    return TrialView(key, True, state, epoch, 10, cost, f"e/{decoder}", finalist=key)


def screen(key: str, state: State, epoch: int = 0) -> TrialView:
    return TrialView(key, False, state, epoch, 4)


def fresh(**over: object) -> Dispatch:
    return Dispatch(Promoter(rungs=[10], eta=2), **{"preempt_after_s": 0.0, **over})  # type: ignore[arg-type]


def yields(d: Dispatch, trials: list[TrialView], key: str, epoch: int, free: int = 0, now: float = 0.0) -> bool:
    [me] = [replace(t, epoch=epoch) for t in trials if t.key == key]
    others = [me if t.key == key else t for t in trials]
    return d.on_result(me, math.nan, 0.0, others, free, now) is Decision.YIELD


def test_a_fold_run_yields_only_when_the_worker_it_frees_goes_to_the_costlier_run() -> None:
    """Two cheap runs (0.01 h an epoch, 10 epochs) hold both workers when a run three times as costly an epoch
    waits: one of them yields, the other keeps its worker (the first one's is the costly run's already)."""
    a, b = fold("a", State.RUNNING, 0.01), fold("b", State.RUNNING, 0.01)
    c = fold("c", State.PENDING, 0.03, decoder="FPN")
    d = fresh()
    trials = [a, b, c]
    assert not yields(d, trials, "a", 10)  # its last epoch: nothing left to yield
    assert yields(d, trials, "a", 2)  # 0.08 h left; c has 0.30 > 1.5 x 0.08
    assert not yields(d, trials, "b", 2)  # a's worker is c's already: b keeps its own
    # Once c runs and a is paused, a free worker resumes a.
    after = [replace(a, state=State.PAUSED, epoch=2), replace(b, state=State.ENDED), replace(c, state=State.RUNNING)]
    assert d.pick(after) == Pick(Kind.RESUME, ("a",))


def test_the_yield_rule_case_by_case() -> None:
    a, b = fold("a", State.RUNNING, 0.01), fold("b", State.RUNNING, 0.01)
    c = fold("c", State.PENDING, 0.03, decoder="FPN")
    assert yields(fresh(), [a, b, c], "a", 7)  # 0.03 h left: c has 10 times that
    assert not yields(fresh(), [a, b, fold("c", State.PENDING, 0.01)], "a", 2)  # not costlier: same architecture
    assert not yields(fresh(), [a, b, fold("c", State.PENDING, 0.02)], "a", 2)  # costlier, not 1.5 x as long
    assert not yields(fresh(), [a, c], "a", 2, free=1)  # a worker is free for c
    assert not yields(fresh(), [a, b, c, screen("s", State.PENDING)], "a", 2)  # screening goes first
    assert not yields(fresh(preempt=False), [a, b, c], "a", 2)
    # The worker goes to the waiting run with the most hours left, a fresh run e of a's own architecture (0.10 h),
    # not the costlier c paused at epoch 9 of 10 (0.03 h, enough against a's last 0.01 h): no yield.
    c9, e = fold("c", State.PAUSED, 0.03, "FPN", epoch=9), fold("e", State.PENDING, 0.01)
    assert yields(fresh(), [a, b, c9], "a", 9)
    assert not yields(fresh(), [a, b, c9, e], "a", 9)
    # Unknown costs pre-empt nothing and are never pre-empted.
    assert not yields(fresh(), [fold("a", State.RUNNING, decoder="Linknet"), b, c], "a", 2)
    assert not yields(fresh(), [a, b, fold("c", State.PENDING, decoder="FPN")], "a", 2)


def test_a_run_asked_to_yield_that_runs_again_is_not_leaving_any_more() -> None:
    """A run asked to yield that the backend requeues instead (its node lost during the save) and that runs
    again holds its worker: the next run's yield is then the costly run's worker."""
    a, b, c = fold("a", State.RUNNING, 0.01), fold("b", State.RUNNING, 0.01), fold("c", State.PENDING, 0.03, "FPN")
    d = fresh()
    assert yields(d, [a, b, c], "a", 2)
    assert d.leaving == {"a"}
    d.pick([replace(a, state=State.PENDING, epoch=2), b, c])
    assert d.leaving == set()
    assert yields(d, [replace(a, epoch=2), b, c], "b", 3)


def test_a_fold_run_yields_only_after_the_costly_one_has_waited_the_preemption_delay() -> None:
    """A run waiting for a node the autoscaler is starting takes nobody's worker: it must have waited
    PREEMPT_AFTER_S (seconds of the backend's clock) first."""
    assert PREEMPT_AFTER_S == 900.0
    a, b, c = fold("a", State.RUNNING, 0.01), fold("b", State.RUNNING, 0.01), fold("c", State.PENDING, 0.03, "FPN")
    d = fresh(preempt_after_s=PREEMPT_AFTER_S)
    assert not yields(d, [a, b, c], "a", 2, now=1000.0)  # c first seen waiting now
    assert not yields(d, [a, b, c], "a", 3, now=1000.0 + PREEMPT_AFTER_S - 1)
    assert yields(d, [a, b, c], "a", 4, now=1000.0 + PREEMPT_AFTER_S)
    # Once c runs, its wait is forgotten: waiting again, it waits the whole delay again.
    d.pick([replace(a, state=State.PAUSED), b, replace(c, state=State.RUNNING)], now=2000.0)
    assert "c" not in d.waiting_since


def test_waiting_fold_runs_go_by_hours_left() -> None:
    """Not started: b (3 h an epoch, 200 epochs: 600 h), c (400 h), a (200 h); a paused run of b at epoch 150 has
    150 h left, so it comes last: hours left count, not the architecture. Unknown costs go last."""

    def run(key: str, finalist: str, hours: float, epoch: int = 0, state: State = State.PENDING) -> TrialView:
        return TrialView(key, True, state, epoch, 200, hours, f"{finalist}/Unet", finalist)

    folds = [run("a1", "a", 1.0), run("b1", "b", 3.0), run("c1", "c", 2.0), run("b2", "b", 3.0, 150, State.PAUSED)]
    d = fresh()
    assert [t.key for t in d.fold_order(folds)] == ["b1", "c1", "a1", "b2"]
    assert d.pick(folds) == Pick(Kind.START, ("b1",))
    unknown = run("x1", "x", math.nan)
    assert [t.key for t in d.fold_order([unknown, *folds])][-1] == "x1"


def test_fold_run_costs_are_per_architecture_means_or_the_promoters_record() -> None:
    """Two finalists of one architecture measured 0.10 and 0.12 h an epoch: all their fold runs cost 0.11, so
    they never pre-empt each other on noise; an architecture none of whose runs carries a cost is unknown. Where
    no run carries a cost at all, the promoter's record of each finalist's screening is used instead."""
    runs = [
        TrialView("p/fold1", True, State.PENDING, 0, 200, 0.10, "a/Unet", "p"),
        TrialView("q/fold1", True, State.PENDING, 0, 200, 0.12, "a/Unet", "q"),
        TrialView("r/fold1", True, State.PENDING, 0, 200, 0.3, "a/FPN", "r"),
        TrialView("s/fold1", True, State.PENDING, 0, 200, math.nan, "b/Unet", "s"),
    ]
    d = fresh()
    cost = d.costs(runs)
    assert [cost[t.key] for t in runs[:3]] == pytest.approx([0.11, 0.11, 0.3])
    assert math.isnan(cost["s/fold1"])
    d.promoter.on_result("p", 10, 0.5, gpu_hours=2.0)  # its top rung, 10 epochs: 0.2 GPU-hours an epoch
    uncarried = [replace(t, cost=math.nan) for t in runs]
    assert d.costs(uncarried)["p/fold1"] == pytest.approx(0.2)
    assert d.costs(uncarried)["q/fold1"] == pytest.approx(0.2)  # its architecture's mean
    assert math.isnan(d.costs(uncarried)["s/fold1"])


def test_a_free_worker_resumes_promotions_first_then_starts_new_trials_then_fold_runs() -> None:
    d = Dispatch(Promoter(rungs=[1, 2, 4], eta=2))
    assert d.on_result(screen("t0", State.RUNNING, 1), 0.5, 0.0) is Decision.PAUSE  # alone at rung 1: k = 0
    assert d.on_result(screen("t1", State.RUNNING, 1), 0.9, 0.0) is Decision.CONTINUE  # top 1 of 2
    assert d.on_result(screen("t2", State.RUNNING, 1), 0.7, 0.0) is Decision.PAUSE  # 0.7 < 0.9: top 1 of 3
    assert d.on_result(screen("t3", State.RUNNING, 1), 0.1, 0.0) is Decision.PAUSE  # 4 results: t2 is promotable
    trials = [
        screen("t0", State.PAUSED, 1),
        screen("t1", State.RUNNING, 2),
        screen("t2", State.PAUSED, 1),
        screen("t3", State.PAUSED, 1),
        screen("t4", State.PENDING),
        fold("f", State.PENDING, 1.0),
    ]
    assert d.pick(trials) == Pick(Kind.RESUME, ("t2",))
    trials[2] = screen("t2", State.RUNNING, 1)
    assert d.pick(trials) == Pick(Kind.START, ("t4",))
    trials[4] = screen("t4", State.RUNNING)
    assert d.pick(trials) == Pick(Kind.START, ("f",))  # screening has nothing for the worker: a fold run


def test_when_nothing_runs_the_rungs_close_and_the_hopeless_trials_are_stopped() -> None:
    """Nothing runs and nothing is new: the promoter's close promotes the best waiting trial of a rung that
    promoted nobody; once nothing can be promoted, the waiting trials are stopped and a fold run takes the
    worker. A stopped trial is not offered again."""
    d = Dispatch(Promoter(rungs=[1, 4], eta=3))
    for key, value in (("t0", 0.5), ("t1", 0.7)):
        assert d.on_result(screen(key, State.RUNNING, 1), value, 0.0) is Decision.PAUSE  # 2 // 3 = 0 promoted
    waiting = [screen("t0", State.PAUSED, 1), screen("t1", State.PAUSED, 1), fold("f", State.PENDING, 1.0)]
    assert d.pick(waiting) == Pick(Kind.RESUME, ("t1",))  # the best of rung 1
    waiting[1] = screen("t1", State.ENDED, 4)
    assert d.pick(waiting) == Pick(Kind.STOP, ("t0",))
    assert d.pick(waiting) == Pick(Kind.START, ("f",))
    assert d.pick(waiting[:2]) == Pick(Kind.NOTHING)


def test_a_trial_created_again_while_the_promoter_holds_it_waits_for_a_promotion() -> None:
    d = Dispatch(Promoter(rungs=[1, 2], eta=2))
    d.on_result(screen("t0", State.RUNNING, 1), 0.5, 0.0)
    assert d.enters_paused("t0") and not d.enters_paused("t9")
    # A PENDING trial the promoter holds at a rung is waiting, not new: the worker goes to the new one.
    assert d.pick([screen("t0", State.PENDING, 1), screen("t1", State.PENDING)]) == Pick(Kind.START, ("t1",))


def test_the_state_round_trips_through_promoter_json() -> None:
    d = Dispatch(Promoter(rungs=[1, 2, 4], eta=2))
    for i, v in enumerate((0.5, 0.9, 0.7, 0.1)):
        d.on_result(screen(f"t{i}", State.RUNNING, 1), v, 0.25 * (i + 1))
    d.pick([screen("t0", State.PAUSED, 1), screen("t2", State.PAUSED, 1), screen("t3", State.PAUSED, 1),
            screen("t1", State.RUNNING, 1), screen("t4", State.RUNNING)])  # fmt: skip
    d.resume.append("t0")
    d.leaving.add("x")
    d.unstarted["t9"] = {"lr": 0.1}  # a grid point beyond the budget, started by a reopened sweep
    text = json.dumps(d.to_dict())
    assert set(json.loads(text)) == {"promoter", "resume", "unstarted"}
    back = Dispatch.from_dict(json.loads(text))
    assert back.to_dict() == d.to_dict() and back.resume == d.resume and back.leaving == set()
    assert back.unstarted == {"t9": {"lr": 0.1}}
    held = Promoter(rungs=[1])
    other = Dispatch(held)
    other.load(json.loads(text))
    assert other.promoter is held and held.to_dict() == d.promoter.to_dict()  # updated in place

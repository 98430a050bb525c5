"""The sweep simulator: the event clock, the policies (the real promoter among them), the curve family, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from geopose_ray.cli import main
from geopose_ray.simulate import (
    AshaPolicy,
    Curves,
    GridPolicy,
    RandomPolicy,
    Run,
    SweepPolicy,
    draw_curves,
    evaluate,
    replay,
    simulate,
    simulate_seed,
)
from geopose_ray.simulate.curves import DECODERS, ENCODERS, SEED_ENCODERS, curve
from geopose_ray.simulate.engine import RESUME_H
from geopose_ray.simulate.measure import POLICIES
from geopose_ray.sweep.promoter import Promoter


def hand_curves(scores: list[list[float]], minutes: list[float], fail: list[int] | None = None) -> Curves:
    """Curves from explicit per-epoch scores (true final = the last one)."""
    obs = np.array(scores, dtype=float)
    n, top = obs.shape
    fail_epoch = np.array(fail if fail is not None else [top + 1] * n)
    return Curves([f"t{i}" for i in range(n)], np.array(minutes, dtype=float), obs, fail_epoch, obs[:, -1].copy())


def test_grid_gpu_hours_are_the_exact_sum_of_epoch_costs() -> None:
    curves = draw_curves(240, seed=3)
    assert (curves.fail_epoch <= curves.top).any()  # some trials error: their cost stops at the failing epoch
    run = replay(curves, 7, GridPolicy(curves, range(len(curves))))
    trained = np.minimum(curves.fail_epoch, curves.top)
    assert np.array_equal(run.epochs, trained)
    assert run.gpu_hours == pytest.approx(float(np.sum(trained * curves.minutes) / 60.0), rel=1e-12)
    assert run.gpu_hours <= 7 * run.makespan_h
    assert len(run.finishes) == int(np.sum(curves.fail_epoch > curves.top))


@pytest.mark.parametrize(("order", "makespan"), [([0, 1, 2], 3.0), ([1, 2, 0], 4.0)])
def test_utilisation_on_a_hand_built_case(order: list[int], makespan: float) -> None:
    # Two workers; trials of 3 h, 1 h and 1 h (two epochs each). In order 0,1,2: worker A runs 0 (0-3 h), worker B
    # runs 1 then 2 (0-2 h): makespan 3 h, busy 5 h. In order 1,2,0: 0 starts only at 1 h: makespan 4 h.
    curves = hand_curves([[0.1, 0.2]] * 3, minutes=[90, 30, 30])
    run = replay(curves, 2, GridPolicy(curves, order))
    assert run.makespan_h == pytest.approx(makespan)
    assert run.gpu_hours == pytest.approx(5.0)
    assert run.utilisation == pytest.approx(5.0 / (2 * makespan))


def test_the_promoter_never_trains_an_epoch_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    curves = draw_curves(240, seed=1)
    resumed: list[str] = []
    real_promote = Promoter.promote

    def spy(self: Promoter, trial: str) -> None:
        resumed.append(trial)
        real_promote(self, trial)

    monkeypatch.setattr(Promoter, "promote", spy)
    order = list(np.random.default_rng(0).permutation(len(curves)))
    policy = SweepPolicy(curves, order, (20, 60, 200), 3, 9)
    run = replay(curves, 16, policy)
    assert len(resumed) >= 5  # paused trials did resume (most promotions happen on arrival)
    assert np.array_equal(run.epochs, run.reached)  # every epoch trained once: resumed, never restarted
    assert run.gpu_hours == pytest.approx(float(np.sum(run.epochs * curves.minutes) / 60.0), rel=1e-9)
    p = policy.dispatch.promoter
    assert set(p.paused).isdisjoint(p.finalists)
    reported = np.minimum(run.reached, curves.fail_epoch - 1)  # the promoter heard of every epoch but a failing one
    assert p.spent_gpu_hours == pytest.approx(float(np.sum(reported * curves.minutes) / 60.0), rel=1e-9)
    # Everyone ran to the first rung (or errored before it); the reached epochs are rungs or failures.
    ok = curves.fail_epoch > 20
    assert np.all(run.reached[ok] >= 20)
    assert set(run.reached[curves.fail_epoch > curves.top]) <= {20, 60, 200}
    assert sorted(policy.names[t] for _, _, t in run.finishes) == sorted(p.finalists)


def _late_bloomer() -> Curves:
    """Trial 1 (L) arrives second below trial 0 at rung 2 and wins at the top; the rest are weaker throughout."""
    plateaus = [0.70, None, 0.60, 0.30, 0.25, 0.20, 0.15, 0.10, 0.05]
    scores = []
    for q in plateaus:
        if q is None:
            scores.append([0.50 if e <= 2 else min(0.95, 0.5 + 0.1 * e) for e in range(1, 19)])
        else:
            scores.append([q * (1 - math.exp(-e)) for e in range(1, 19)])
    return hand_curves(scores, minutes=[60] * 9)


def test_asha_stops_the_late_bloomer_that_the_promoter_keeps() -> None:
    curves = _late_bloomer()
    order = list(range(9))
    asha = AshaPolicy(curves, order, (2, 6, 18), 3)
    asha_run = replay(curves, 1, asha)
    promoter_run = replay(curves, 1, SweepPolicy(curves, order, (2, 6, 18), 3, 1))
    assert 1 in asha.stopped and asha_run.reached[1] == 2
    assert 1 in {t for _, _, t in promoter_run.finishes}
    assert evaluate(promoter_run, curves, math.inf).regret == pytest.approx(0.0)
    assert evaluate(asha_run, curves, math.inf).regret == pytest.approx(0.95 - 0.70, abs=1e-3)


def test_asha_cutoff_is_rays_percentile_of_earlier_results() -> None:
    # Rung 1: 0.5 continues (nothing recorded), 0.4 stops (below 0.5), 0.6 continues (above the 66.7th percentile
    # of [0.5, 0.4] = 0.4667), 0.45 stops (below that of [0.5, 0.4, 0.6] = 0.5333).
    curves = hand_curves([[v, v] for v in (0.5, 0.4, 0.6, 0.45)], minutes=[60] * 4)
    asha = AshaPolicy(curves, [0, 1, 2, 3], (1, 2), 3)
    run = replay(curves, 1, asha)
    assert asha.stopped == {1, 3}
    assert list(run.reached) == [2, 1, 2, 1]


def test_the_sweep_policy_resumes_a_promoted_trial_before_it_starts_a_new_one() -> None:
    """One worker, 60 trials: whenever the promoter has a paused trial to promote, the free worker resumes it
    (towards the next rung), though new trials wait; as asynchronous successive halving has it."""
    curves = draw_curves(60, seed=2)
    policy = SweepPolicy(curves, list(range(60)), (20, 60, 200), 3, 1)
    seen: list[tuple[bool, tuple[int, int]]] = []
    real = policy.next_job

    def logged(now: float = 0.0, free: int = 1) -> tuple[int, int] | None:
        promotable = bool(policy.dispatch.promoter.promotable())
        job = real(now, free)
        if job is not None:
            seen.append((promotable, job))
        return job

    policy.next_job = logged  # type: ignore[method-assign]
    replay(curves, 1, policy)
    resumed = [job for promotable, job in seen if promotable]
    assert len(resumed) >= 3 and all(stop > 20 for _, stop in resumed)
    new = [i for i, (_, (_, stop)) in enumerate(seen) if stop == 20]
    assert len(new) == 60 and any(stop > 20 for _, (_, stop) in seen[: new[-1]])  # resumed while new ones waited


def test_fold_runs_after_screening_or_backfilling_the_idle_workers() -> None:
    curves = draw_curves(240, seed=2)
    order = [int(i) for i in np.random.default_rng(2).permutation(240)]

    def sweep(fold_runs: int = 0, backfill: bool = True) -> SweepPolicy:
        return SweepPolicy(curves, order, (20, 60, 200), 3, 9, fold_runs=fold_runs, backfill=backfill)

    alone = replay(curves, 16, sweep())
    after = replay(curves, 16, sweep(4, backfill=False), fold_runs=4)
    back = replay(curves, 16, sweep(4, backfill=True), fold_runs=4)
    # After screening (search: grid): screening exactly as alone, then 4 runs of 200 epochs per finalist.
    assert after.screen_h == pytest.approx(alone.makespan_h) and after.screen_busy_h == pytest.approx(alone.gpu_hours)
    assert np.array_equal(after.epochs, alone.epochs)
    for run in (after, back):
        finalists = [t for _, _, t in run.finishes]
        assert run.fold_gpu_hours == pytest.approx(sum(4 * curves.hours(t, 200) for t in finalists))
        assert run.gpu_hours == pytest.approx(run.fold_gpu_hours + float(np.sum(run.epochs * curves.minutes)) / 60)
    # Backfilled (search: guided): no worker idles while screening, and the whole pipeline ends sooner. Screening
    # itself is not delayed on this seed (promotions mostly come with a pause, which frees a worker).
    assert back.screen_utilisation > 0.99 > 0.9 > alone.utilisation
    assert back.makespan_h < after.makespan_h
    assert back.screen_h == pytest.approx(alone.makespan_h) and np.array_equal(back.epochs, alone.epochs)


def test_the_longest_fold_runs_start_first() -> None:
    """Two workers, three one-epoch trials screened in grid order (one rung: each is a finalist), one fold run
    each, after screening. Trials 0 and 1 cost 1 h an epoch and end at hour 1; trial 2 costs 3 h and ends
    screening at hour 4. The costliest first, run 2 takes hours 4-7 while 0 and 1 share the other worker: the
    pipeline ends at 7 (in the order the finalists finished, run 2 would take hours 5-8)."""
    curves = hand_curves([[0.8], [0.7], [0.9]], minutes=[60, 60, 180])
    policy = SweepPolicy(curves, [0, 1, 2], (1,), 2, 1, fold_runs=1, backfill=False)
    run = replay(curves, 2, policy, fold_runs=1)
    assert run.screen_h == pytest.approx(4.0) and run.makespan_h == pytest.approx(7.0)
    assert run.fold_gpu_hours == pytest.approx(5.0)


def test_a_waiting_fold_run_of_a_costlier_architecture_pre_empts_a_running_one() -> None:
    """Three workers, four epochs, one rung (every trial a finalist), three runs per finalist. Trials 0 and 1 cost
    0.75 h an epoch (3 h a run) and end screening at hour 3; trial 2 costs 2 h an epoch and screens until hour 8.
    Trials 0 and 1's six runs take two workers from hour 3: two at a time, 3-6, then 6-9. At hour 8 trial 2's
    worker takes one of its own runs. Without pre-emption its other two wait for hour 9 and end at 17, and the
    last cheap run ends at 20. With it, at hour 8.25 (an epoch before their end, 0.75 h left, less than 8 h / 1.5,
    and the costly runs have waited the 15 minutes a pre-emption needs) both cheap runs yield: trial 2's runs end
    at 16 and 16.25, the two cheap runs not yet started take 16-19 and 16.25-19.25, and the two pre-empted ones
    restart (RESUME_H each) on the third worker. Two runs of one architecture never pre-empt each other (none
    does before hour 8 here). Waiting a minute less than that at hour 8.25 (a 16-minute wait) changes the story:
    the cheap runs end at 9 first."""
    curves = hand_curves([[0.8] * 4, [0.8] * 4, [0.9] * 4], minutes=[45, 45, 120])

    def pipeline(preempt: bool, after_s: float = 900.0) -> Run:
        policy = SweepPolicy(curves, [0, 1, 2], (4,), 2, 1, fold_runs=3, preempt=preempt, preempt_after_s=after_s)
        return replay(curves, 3, policy, fold_runs=3)

    plain, pre = pipeline(False), pipeline(True)
    assert plain.makespan_h == pytest.approx(20.0) and plain.fold_restarts == 0
    assert pre.makespan_h == pytest.approx(19.25) and pre.fold_restarts == 2
    assert pre.fold_gpu_hours == pytest.approx(6 * 3.0 + 3 * 8.0 + 2 * RESUME_H)
    assert np.array_equal(pre.epochs, plain.epochs) and len(pre.fold_finishes) == len(plain.fold_finishes) == 9
    patient = pipeline(True, after_s=960.0)
    assert patient.fold_restarts == 0 and patient.makespan_h == pytest.approx(plain.makespan_h)


def test_pre_empted_fold_runs_train_every_epoch_once_and_end_no_later() -> None:
    curves = draw_curves(240, seed=6)
    order = [int(i) for i in np.random.default_rng(6).permutation(240)]

    def pipeline(preempt: bool) -> Run:
        policy = SweepPolicy(curves, order, (20, 40, 100, 200), 3, 9, fold_runs=4, preempt=preempt)
        return replay(curves, 16, policy, fold_runs=4)

    plain, pre = pipeline(False), pipeline(True)
    assert pre.fold_restarts > 0
    finalists = [t for _, _, t in pre.finishes]
    assert pre.fold_gpu_hours == pytest.approx(
        sum(4 * curves.hours(t, 200) for t in finalists) + pre.fold_restarts * RESUME_H
    )
    assert sorted(j for _, _, j in pre.fold_finishes) == sorted(j for _, _, j in plain.fold_finishes)
    assert pre.makespan_h < plain.makespan_h and pre.utilisation > plain.utilisation


def test_random_search_stays_within_its_budget() -> None:
    curves = draw_curves(240, seed=4)
    budget = 2000.0
    run = replay(curves, 16, RandomPolicy(curves, range(240), budget))
    assert budget - 3 * curves.hours(int(np.argmax(curves.minutes)), 200) < run.gpu_hours <= budget
    started = run.reached > 0
    assert np.array_equal(run.reached[started], np.minimum(200, curves.fail_epoch[started]))  # all to the top


def test_the_curve_family_reproduces_the_seed_table() -> None:
    """The U-Net rows of the seed's screening table (docs/simulator.md), and DeepLabV3/ResNet34 and FPN/ResNeXt50,
    within 0.0025."""
    table = {
        ("resnet34", "Unet"): [(200, 0.8224), (300, 0.8260), (400, 0.8286), (500, 0.8294)],
        ("efficientnet-b0", "Unet"): [(200, 0.7929), (400, 0.7938)],
        ("inceptionv4", "Unet"): [(90, 0.8154), (170, 0.8200), (290, 0.8247), (400, 0.8195)],
        ("se_resnext50_32x4d", "Unet"): [(120, 0.8263), (180, 0.8213), (240, 0.8221)],
        ("tu-regnetx_064", "Unet"): [(80, 0.8234), (150, 0.8202)],
        ("resnext50_32x4d", "Unet"): [(100, 0.8273), (170, 0.8306), (230, 0.8333)],
        ("resnet34", "DeepLabV3"): [(140, 0.8010), (350, 0.8139)],
        ("resnext50_32x4d", "FPN"): [(140, 0.8090), (330, 0.8089)],
    }
    for (enc, dec), points in table.items():
        e, d = ENCODERS[enc], DECODERS[dec]
        epochs = np.array([p for p, _ in points])
        s = curve(np.array([e.plateau + d.plateau]), np.array([e.rise * d.rise]), [e.peak], [e.kappa], epochs)[0]
        assert np.abs(s - [v for _, v in points]).max() < 0.0025, (enc, dec, s)
    minutes = {(k, d): ENCODERS[k].minutes * DECODERS[d].cost for k in ENCODERS for d in DECODERS}
    assert minutes["resnet34", "DeepLabV3"] == pytest.approx(25.0) and minutes["resnext50_32x4d", "FPN"] == 14.0
    assert minutes["tu-regnetx_064", "Unet"] == 29.0


def test_populations_are_the_seed_grid_and_deterministic() -> None:
    a, b, c = draw_curves(240, 5), draw_curves(240, 5), draw_curves(240, 6)
    assert np.array_equal(a.observed, b.observed, equal_nan=True) and a.names == b.names
    assert not np.array_equal(a.true_final, c.true_final, equal_nan=True)
    assert len(set(a.names)) == 240 and {n.split("/")[1] for n in a.names} == set(SEED_ENCODERS)
    screen_t4 = draw_curves(720, 5, top=20)  # screen-t4.yaml's grid, accumulation included
    assert len(set(screen_t4.names)) == 720 and {n.split("/")[1] for n in screen_t4.names} == set(SEED_ENCODERS)
    assert {n.split("/")[3] for n in screen_t4.names} == {"acc1", "acc4", "acc16"}
    large = draw_curves(1000, 5)
    assert len(set(large.names)) == 1000 and len({n.split("/")[1] for n in large.names}) == len(ENCODERS)
    # Reported scores never beat the noise-free curve by more than a few σ; an errored trial reports nothing after.
    failed = np.flatnonzero(a.fail_epoch <= a.top)
    for t in failed:
        assert np.all(np.isnan(a.observed[t, a.fail_epoch[t] - 1 :])) and np.isnan(a.true_final[t])


def test_instability_and_slow_starts_follow_the_learning_rate() -> None:
    curves = draw_curves(1440, seed=0)
    lr = np.array([float(n.split("/lr")[1].split("/")[0]) for n in curves.names])
    errored = curves.fail_epoch <= curves.top  # a non-finite loss; as many again collapse
    assert errored[lr == 1e-3].mean() > 0.1 > 0.03 > errored[lr == 1e-4].mean() >= errored[lr == 1e-5].mean()
    assert np.nanmedian(curves.observed[lr == 1e-5, 19]) < np.nanmedian(curves.observed[lr == 1e-4, 19]) - 0.02


def test_at_the_seeds_scale_the_promoter_screens_at_a_quarter_of_the_grid_and_finds_the_best() -> None:
    """What the simulator shows on 6 seeds (docs/benchmarks/sweep-targets.md has the targets and where they are not
    met)."""
    result = simulate(trials=240, workers=16, seeds=6)
    p, grid, rnd = (result["policies"][k] for k in ("promoter", "grid", "random"))
    assert 0.2 < p["grid_share"]["median"] < 0.35
    assert p["best_found_rate"] >= 5 / 6 and p["near_best_rate"] >= 5 / 6
    assert p["regret_at_budget"]["mean"] < rnd["regret_at_budget"]["mean"]
    assert p["regret_at_budget"]["mean"] < grid["regret_at_budget"]["mean"]  # the grid, stopped at the same GPU-hours
    assert p["grid_share_to_near_best"]["median"] < grid["grid_share_to_near_best"]["median"]
    assert 0.6 < p["utilisation"]["median"] < grid["utilisation"]["median"]
    # An autoscaling pool releases idle workers: it pays for little more than the busy time.
    assert p["utilisation"]["median"] < 0.99 < p["autoscaled_utilisation"]["median"] < 1.0
    # The guided order starts the promising configurations first: a good pick comes sooner, for the same spend.
    for q in result["policies"].values():  # a finalist comes near the best no later than the pick does
        assert q["near_finalist_within_share_rate"] >= q["near_best_within_share_rate"]
    g = result["policies"]["promoter, guided order"]
    assert g["near_best_within_share_rate"] > p["near_best_within_share_rate"]
    assert g["grid_share_to_near_best"]["median"] < p["grid_share_to_near_best"]["median"]
    assert abs(g["grid_share"]["median"] - p["grid_share"]["median"]) < 0.03


def test_every_policy_sees_the_same_curves_and_budget() -> None:
    curves, outcomes = simulate_seed(0, trials=60, workers=4)
    assert list(outcomes) == list(POLICIES)
    assert outcomes["random"].gpu_hours <= outcomes["promoter"].gpu_hours + 1e-9
    assert outcomes["grid"].finalists == int(np.sum(curves.fail_epoch > curves.top))


def test_cli_json_has_every_measure_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--trials", "60", "--workers", "4", "--seeds", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == set(POLICIES)
    for p in out["policies"].values():
        for key in ("gpu_hours", "makespan_h", "utilisation", "regret", "regret_at_budget", "hours_to_near_best"):
            assert set(p[key]) == {"median", "p10", "p90", "mean"}
        assert 0 <= p["best_found_rate"] <= 1 and 0 <= p["near_best_within_share_rate"] <= 1
    assert out["config"]["trials"] == 60 and set(out["targets"]) == {"promoter", "promoter, guided order"}
    assert set(out["targets"]["promoter"]) >= {"utilisation_at_least_95pct", "mean_regret_at_budget"}
    assert main(["simulate", "--trials", "60", "--workers", "4", "--seeds", "1"]) == 0
    assert "| promoter |" in capsys.readouterr().out
    assert main(["simulate", "--rungs", "20,10,200"]) == 2
    assert "rungs" in capsys.readouterr().err


def test_rates_come_with_wilson_intervals() -> None:
    """95 % Wilson score intervals, as tabulated for small samples (0 of 10: 0–0.278; 5 of 10: 0.237–0.763)."""
    from geopose_ray.simulate.measure import wilson

    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson(45, 50)
    assert lo < 0.9 < hi and hi - lo < 0.2


def test_the_pick_after_the_fold_stage_is_the_best_mean_over_all_folds() -> None:
    """Three finalists, two folds each (the screening fold and one fold run). Trial 0 is lucky on its screening
    fold (0.85 against a true 0.80) but not on the other; the 2-fold means (0.820, 0.830, 0.8205) pick trial 1,
    the true best, once its fold run ends, at 30 GPU-hours."""
    from geopose_ray.simulate.engine import Run
    from geopose_ray.simulate.measure import fold_pick, grid_gpu_hours

    curves = hand_curves([[0.5, 0.85], [0.5, 0.82], [0.5, 0.821]], minutes=[60, 60, 60])
    curves.true_final[:] = [0.80, 0.83, 0.82]
    scores = np.array([[0.79], [0.84], [0.82]])
    # Fold runs are job ids n + trial × (K − 1) + k: here 3, 4, 5 for trials 0, 1, 2.
    run = Run("x", 1, np.full(3, 2), np.full(3, 2), 9.0, 9.0, fold_finishes=[(1, 10, 3), (2, 20, 5), (3, 30, 4)])
    assert fold_pick(run, curves, 2, scores) == (30, pytest.approx(0.0))
    run.fold_finishes = run.fold_finishes[:2]  # trial 1's never ends: trial 2 (0.8205 > 0.820) is the last pick
    assert fold_pick(run, curves, 2, scores) == (None, pytest.approx(0.01))
    assert grid_gpu_hours(curves) == pytest.approx(6.0)


@pytest.mark.parametrize("persistent", [0.0, 0.5, 1.0])
def test_fold_scores_scatter_about_the_true_score_by_each_trials_noise(persistent: float) -> None:
    """A fold run's score_avg (the mean of its last 10 of 200 epochs) is off the true score by the run's own
    deviation plus a tenth of the epochs' wobble variance: sd √(p + (1 − p)/10) in units of the trial's noise."""
    from geopose_ray.simulate.measure import fold_scores

    curves = draw_curves(240, seed=4, persistent=persistent)
    ok = ~np.isnan(curves.true_final)
    scores = fold_scores(curves, 4, seed=4)
    z = (scores[ok] - curves.true_final[ok, None]) / np.asarray(curves.noise)[ok, None]
    sd = math.sqrt(persistent + (1 - persistent) / 10)
    assert scores.shape == (240, 4) and abs(float(z.mean())) < 0.1 and float(z.std()) == pytest.approx(sd, rel=0.1)
    assert np.asarray(curves.noise).max() > 2 * np.asarray(curves.noise).min()  # higher at high learning rates


@pytest.mark.parametrize(("persistent", "own", "step"), [(0.0, 0.0, 1.41), (0.5, 0.71, 1.0), (1.0, 1.0, 0.0)])
def test_the_persistent_share_of_the_noise_does_not_average_out_over_epochs(
    persistent: float, own: float, step: float
) -> None:
    """In units of each trial's noise: one epoch's score moves from the one before by √(2(1 − p)) (the curve
    itself barely moves after epoch 190), and against the same population with independent epochs (p = 0: the
    same curves, the same wobble) the run's mean over its epochs is off by its own deviation, sd √p. Everything
    but the noise is the same whatever the share."""
    curves = draw_curves(240, seed=5, persistent=persistent)
    independent = draw_curves(240, seed=5, persistent=0.0)
    ok = ~np.isnan(curves.true_final)  # reported every epoch
    noise = np.asarray(curves.noise)[ok]
    steps = np.diff(curves.observed[ok, -10:], axis=1) / noise[:, None]
    offset = ((curves.observed[ok] - independent.observed[ok]) / noise[:, None]).mean(axis=1)
    assert float(steps.std()) == pytest.approx(step, abs=0.1)
    assert float(offset.std()) == pytest.approx(own, abs=0.1)
    assert np.array_equal(curves.true_final, independent.true_final, equal_nan=True)
    assert np.array_equal(curves.fail_epoch, independent.fail_epoch) and curves.names == independent.names


def test_finalists_are_picked_by_the_mean_of_their_last_epochs() -> None:
    """40 epochs: score_avg averages the last 2. Trial 0 ends on a lucky epoch (0.86 after 0.80, true 0.80);
    trial 1 is steady at 0.84. The last epoch alone picks trial 0 (regret 0.04); the pick, by score_avg (0.83
    against 0.84), is trial 1 (regret 0)."""
    from geopose_ray.simulate.measure import pick_scores

    curves = hand_curves([[0.5] * 38 + [0.80, 0.86], [0.5] * 38 + [0.84, 0.84]], minutes=[60, 60])
    curves.true_final[:] = [0.80, 0.84]
    assert pick_scores(curves) == pytest.approx([0.83, 0.84])
    outcome = evaluate(replay(curves, 1, GridPolicy(curves, [0, 1])), curves, math.inf)
    assert outcome.regret == pytest.approx(0.0)
    assert outcome.regret_by_last_score == pytest.approx(0.04)


def test_ranking_finalists_by_their_best_epoch_picks_the_lucky_spike() -> None:
    """Trial 0 spikes once (0.90 at epoch 2) and ends at 0.80; trial 1 ends best (0.85). Picked by the top rung's
    score the grid's regret is 0; picked by the best epoch's score (the trainer's best_score) it is 0.05."""
    curves = hand_curves([[0.5, 0.90, 0.79, 0.80], [0.5, 0.7, 0.84, 0.85]], minutes=[60, 60])
    outcome = evaluate(replay(curves, 1, GridPolicy(curves, [0, 1])), curves, math.inf)
    assert outcome.regret == pytest.approx(0.0)
    assert outcome.regret_by_best_score == pytest.approx(0.05)


def test_the_results_table_ranks_by_the_score_at_the_epoch_reached() -> None:
    from geopose_ray.sweep.table import sort_rows

    def row(
        trial: str, epoch: int, score: float, best: float, avg: float | None = None, stage: str = "screen"
    ) -> dict[str, object]:
        r: dict[str, object] = {"trial": trial, "stage": stage, "epoch": epoch, "score": score, "best_score": best}
        return r if avg is None else {**r, "score_avg": avg}

    rows = [
        row("spike", 200, 0.80, 0.90, 0.80),  # its best epoch was a lucky one
        row("steady", 200, 0.85, 0.85, 0.845),
        row("lucky end", 200, 0.86, 0.86, 0.83),  # its last epoch is its best: the last ones' mean says otherwise
        row("no avg", 200, 0.84, 0.84),  # a row from before score_avg: ranked by its score
        row("early", 40, 0.95, 0.95, 0.95),  # paused at a lower rung: below every finalist
        row("fold", 200, 0.99, 0.99, 0.99, stage="fold"),
        row("nan", 200, float("nan"), float("nan"), float("nan")),
    ]
    assert [r["trial"] for r in sort_rows(rows)] == ["steady", "no avg", "lucky end", "spike", "nan", "early", "fold"]


def test_the_results_table_ranks_finalists_by_their_mean_over_folds() -> None:
    """Finalist "lucky" has the best screening score_avg (0.86) but its fold runs say 0.80 and 0.81: its
    3-fold mean is 0.8233, below "steady"'s 0.8417. "early" has one fold run at epoch 200 and one still at
    100: two folds so far, so it comes after both finished finalists whatever its mean. A fold run's own row
    has no cv_score."""
    from geopose_ray.sweep.table import rows_csv, sort_rows

    def row(trial: str, epoch: int, avg: float, stage: str = "screen") -> dict[str, object]:
        return {"trial": trial, "stage": stage, "epoch": epoch, "score": avg, "score_avg": avg, "best_score": avg}

    rows = [
        row("lucky", 200, 0.86), row("lucky/fold1", 200, 0.80, "fold"), row("lucky/fold2", 200, 0.81, "fold"),
        row("steady", 200, 0.84), row("steady/fold1", 200, 0.845, "fold"), row("steady/fold2", 200, 0.84, "fold"),
        row("early", 200, 0.90), row("early/fold1", 200, 0.88, "fold"), row("early/fold2", 100, 0.70, "fold"),
        row("paused", 40, 0.95),
    ]  # fmt: skip
    ranked = sort_rows(rows)
    assert [r["trial"] for r in ranked if r["stage"] == "screen"] == ["steady", "lucky", "early", "paused"]
    cv = {r["trial"]: (r["cv_score"], r["cv_folds"]) for r in ranked if r["stage"] == "screen"}
    assert cv["steady"] == (pytest.approx(0.8416667), 3) and cv["lucky"] == (pytest.approx(0.8233333), 3)
    assert cv["early"] == (pytest.approx(0.89), 2) and cv["paused"] == (pytest.approx(0.95), 1)
    assert all(r["cv_score"] == r["cv_folds"] == "" for r in ranked if r["stage"] == "fold")
    assert "cv_score" not in rows[0]  # the caller's rows are left as they were
    assert rows_csv(rows).splitlines()[1].startswith("steady,screen")

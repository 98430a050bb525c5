"""A GPU-hour budget as a cap: what a grid point costs before it runs, what a budget buys, and a sweep that
spends at most its budget (the dispatch policy the Ray scheduler and the simulator both run)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geopose_ray.engine.config import TrainConfig
from geopose_ray.simulate.curves import Curves
from geopose_ray.simulate.engine import SweepPolicy, replay
from geopose_ray.sweep.cost import (
    SEED_TILES,
    DataSize,
    budget_plan,
    encoder_gmacs,
    epoch_hours,
    halving_hours,
    reference_minutes,
)
from geopose_ray.sweep.dispatch import Dispatch, Kind, State, TrialView
from geopose_ray.sweep.promoter import Decision, Promoter

SEED = DataSize(train_tiles=round(SEED_TILES), val_tiles=5923 - round(SEED_TILES), tile_size=1024)


def _cfg(**over: object) -> TrainConfig:
    return TrainConfig.from_dict(
        {"cache": "c", "model": {"encoder": "resnet34", "decoder": "Unet", "weights": None}, **over}
    )


def test_a_seed_point_costs_its_table_minutes_and_crops_cost_their_pixels() -> None:
    whole = epoch_hours(_cfg(), SEED)
    val = (5923 - round(SEED_TILES)) / round(SEED_TILES) / 3  # forward-only validation, a third of a pixel
    assert whole == pytest.approx(16.5 / 60 * (1 + val), rel=1e-3)
    # 4 crops of 512² train as many pixels as one 1024² tile; 896² × 4 of a 2048² tile 3.06 times as many.
    assert epoch_hours(_cfg(crop=512, crops_per_tile=4), SEED) == pytest.approx(whole, rel=1e-6)
    full = DataSize(SEED.train_tiles, SEED.val_tiles, 2048)
    crops = epoch_hours(_cfg(crop=896, crops_per_tile=4), full)
    assert crops == pytest.approx(16.5 / 60 * (4 * 896**2 / 1024**2 + val * 4), rel=1e-3)
    assert epoch_hours(_cfg(model={"encoder": "resnet34", "decoder": "FPN", "weights": None}), SEED) == (
        pytest.approx(whole * 14 / 18)
    )
    # Validation every 2 epochs costs half as much per epoch; stages cost each at its own crop.
    assert epoch_hours(_cfg(val_every=2), SEED) == pytest.approx(16.5 / 60 * (1 + val / 2), rel=1e-3)
    staged = _cfg(epochs=4, stages=[{"epochs": 2, "crop": 512, "crops_per_tile": 4}, {"crop": 1024}])
    assert epoch_hours(staged, SEED) == pytest.approx(whole, rel=1e-6)


def test_an_unmeasured_encoder_is_scaled_from_its_family_by_counted_multiply_adds() -> None:
    assert encoder_gmacs("resnet34") == pytest.approx(3.66, abs=0.05)  # the published 3.6 GMACs at 224²
    assert encoder_gmacs("resnet18") == pytest.approx(1.82, abs=0.05)
    assert reference_minutes("resnet18") == pytest.approx(16.5 * (0.5 + 0.5 * 1.82 / 3.66), rel=0.02)
    assert reference_minutes("inceptionv4") == 20.0  # measured: as the table has it
    assert reference_minutes("tu-tf_efficientnetv2_s") > reference_minutes("efficientnet-b0")


def test_a_budget_plan_is_the_largest_halving_that_fits() -> None:
    # 9 trials, rungs 1 and 3, η 3, 1 hour an epoch: 9 × 1 + 3 × 2 = 15 hours, 3 finalists.
    assert halving_hours(9, [1, 3], 3, 1.0) == 15.0
    plan = budget_plan([1.0] * 9, [1, 3], 3, 15.0)
    assert (plan.screened, plan.finalists, plan.screens_grid) == (9, 3, True)
    plan = budget_plan([1.0] * 9, [1, 3], 3, 14.0)  # 8 trials: 8 + 2 × 2 = 12; 9 would cost 15
    assert (plan.screened, plan.finalists, plan.screens_grid) == (8, 2, False)
    assert "allows 8 first-rung trials and about 2 finalist(s)" in plan.statement()
    assert budget_plan([1.0] * 9, [1, 3], 3, None).screened == 9


def _view(key: str, state: State, epoch: int = 0) -> TrialView:
    return TrialView(key, fold=False, state=state, epoch=epoch, epochs=4)


def test_a_new_trial_starts_only_if_the_budget_affords_its_first_rung_beside_the_running_ones() -> None:
    # Rungs 2 and 4, 1 GPU-hour an epoch: a running trial at epoch 1 still needs 1 hour to its rung.
    promoter = Promoter([2, 4], 2, "max", 1, budget_gpu_hours=4.5)
    d = Dispatch(promoter)
    a, b = _view("a", State.RUNNING, 1), _view("b", State.RUNNING, 1)
    assert d.on_result(a, 0.5, 1.0, [a, b]) is Decision.CONTINUE  # below the rung
    assert d.on_result(b, 0.4, 1.0, [a, b]) is Decision.CONTINUE
    new = _view("c", State.PENDING)
    # Spent 2, a and b need 1 each to rung 2: 4; c's first rung (2 hours) would make 6 > 4.5.
    assert d.pick([a, b, new]).kind is Kind.NOTHING
    assert d.beyond_budget([a, b, new]) == ["c"]
    # 6 hours would pay for c's first rung but leave nothing to take a trial to the top rung: the first rung's
    # share of 12 hours (successive halving over the 3 trials it affords: 3 × 2 + 2 × 2 epochs, 60 % of them
    # in the first rung) is 7.2, and 2 spent + 2 committed + 2 fit.
    tight = Dispatch(Promoter([2, 4], 2, "max", 1, budget_gpu_hours=6.0))
    tight.on_result(a, 0.5, 1.0, [a, b])
    tight.on_result(b, 0.4, 1.0, [a, b])
    assert tight.pick([a, b, new]).kind is Kind.NOTHING
    assert tight.promoter.rung_shares() == pytest.approx([1 / 3, 1.0])
    loose = Dispatch(Promoter([2, 4], 2, "max", 1, budget_gpu_hours=12.0))
    loose.on_result(a, 0.5, 1.0, [a, b])
    loose.on_result(b, 0.4, 1.0, [a, b])
    assert loose.pick([a, b, new]).key == "c" and loose.beyond_budget([a, b, new]) == []


def test_a_promotion_the_budget_cannot_afford_is_held_back() -> None:
    promoter = Promoter([1, 3], 2, "max", 2, budget_gpu_hours=3.0)
    for trial, score in (("a", 0.9), ("b", 0.5)):
        promoter.on_result(trial, 1, score, gpu_hours=1.0)
    # a qualifies (top 1 of 2) but needs 2 more hours to rung 3: 2 spent + 2 > 3.
    assert promoter.promotable() == [] and promoter.held_back() == ["a"]
    assert promoter.close() == []
    promoter.budget_gpu_hours = 4.0
    assert promoter.promotable() == ["a"] and promoter.held_back() == []


def _flat_curves(n: int, top: int, minutes: float = 60.0) -> Curves:
    rng = np.random.default_rng(0)
    levels = rng.uniform(0.5, 0.9, n)
    observed = np.repeat(levels[:, None], top, axis=1)
    return Curves(
        [f"Unet/resnet34/lr{i}/acc1" for i in range(n)], np.full(n, minutes), observed,
        np.full(n, top + 1), levels,
    )  # fmt: skip


@pytest.mark.parametrize("budget", [10.0, 25.0, 60.0])
def test_the_simulated_sweep_spends_at_most_its_budget_plus_the_epochs_in_flight(budget: float) -> None:
    """Before, the budget stopped promotions only: every first-rung trial still started, and a sweep of 40
    trials with a first rung of 2 hours spent at least 80 hours whatever its budget."""
    curves = _flat_curves(40, 8)
    policy = SweepPolicy(curves, list(range(40)), [2, 4, 8], 2, 1, budget)
    run = replay(curves, 4, policy)
    spent = policy.dispatch.promoter.spent_gpu_hours
    assert spent <= budget + 4 * 1.0  # one epoch of each of the 4 workers' trials may be in flight
    assert spent >= budget - 2 * 2.0  # and it is spent: what is left does not buy another first rung
    assert run.gpu_hours == pytest.approx(spent)
    assert not math.isnan(policy.dispatch.promoter.mean_epoch_cost)
    # The first rungs leave the top rung its share: the budget buys a finalist, not only first-rung results,
    # once it pays for more than the first rung of the 4 trials that start before any cost is known.
    assert bool(policy.dispatch.promoter.finalists) is (budget > 4 * 2 + 8)

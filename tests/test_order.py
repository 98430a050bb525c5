"""The guided grid order: every configuration once, levels covered first, then the promising ones early."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from geopose_ray.errors import ConfigError
from geopose_ray.sweep.order import GuidedOrder

ENCODERS = [f"e{i}" for i in range(6)]
DECODERS = [f"d{i}" for i in range(8)]
LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]


def _grid() -> list[dict[str, object]]:
    return [{"encoder": e, "decoder": d, "lr": lr} for e, d, lr in itertools.product(ENCODERS, DECODERS, LRS)]


def _additive(seed: int) -> np.ndarray:
    """A first-rung score per grid point: encoder + decoder + learning-rate effects and trial noise."""
    rng = np.random.default_rng(seed)
    e, d, lr = rng.normal(0, 0.01, 6), rng.normal(0, 0.01, 8), -0.01 * (np.arange(5) - rng.integers(0, 5)) ** 2
    grid = _grid()
    return np.array(
        [
            e[ENCODERS.index(str(c["encoder"]))] + d[DECODERS.index(str(c["decoder"]))] + lr[LRS.index(c["lr"])]
            for c in grid
        ]
    ) + rng.normal(0, 0.003, len(grid))


def _run(order: GuidedOrder, scores: np.ndarray, fail: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    picks = []
    while (i := order.next()) is not None:
        picks.append(i)
        order.observe(i, None if i in fail else float(scores[i]))
    return picks


def test_every_configuration_starts_exactly_once_and_every_level_early() -> None:
    order = GuidedOrder(_grid(), seed=3)
    picks = _run(order, _additive(3))
    assert sorted(picks) == list(range(240)) and order.next() is None and order.remaining == 0
    assert order.axes == ["decoder", "encoder", "lr"]
    first = [_grid()[i] for i in picks[:16]]  # 2 × the largest axis
    assert {c["encoder"] for c in first} == set(ENCODERS) and {c["decoder"] for c in first} == set(DECODERS)
    assert {c["lr"] for c in first} == set(LRS)


def test_the_best_configurations_start_early_when_scores_are_nearly_additive() -> None:
    """Over seeds, the 10 best grid points start in the first fifth of the order on average (a random order puts
    them at the middle, an order that prefers low scores at the end)."""
    positions = []
    for seed in range(5):
        scores = _additive(seed)
        picks = _run(GuidedOrder(_grid(), seed=seed), scores)
        where = {p: k for k, p in enumerate(picks)}
        positions += [where[i] / 240 for i in np.argsort(scores)[-10:]]
    assert float(np.mean(positions)) < 0.2


def test_a_configuration_that_fails_before_the_first_rung_ranks_lowest() -> None:
    """Points at the largest learning rate all fail (no score): after the cover phase they are left to the end."""
    grid = _grid()
    bad = {i for i, c in enumerate(grid) if c["lr"] == LRS[-1]}
    scores = np.full(240, 0.8) + np.random.default_rng(0).normal(0, 0.001, 240)  # failures aside, all alike
    picks = _run(GuidedOrder(grid, seed=1), scores, fail=bad)
    late = [k for k, p in enumerate(picks) if p in bad]
    assert np.mean(late) > 0.75 * 240  # 48 points: uniformly placed they would average 120


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ConfigError, match="at least one configuration"):
        GuidedOrder([])
    with pytest.raises(ConfigError, match="`cover >= 0`"):
        GuidedOrder(_grid(), cover=-1)
    with pytest.raises(ConfigError, match="No configuration 240"):
        GuidedOrder(_grid()).observe(240, 0.5)


def test_the_tune_searcher_restored_from_its_save_goes_on_as_the_original(tmp_path: Path) -> None:
    """Tune pickles the searcher with the experiment; a restarted driver's searcher makes the same next choices."""
    from geopose_ray.cluster.search import GuidedSearch

    points = [
        {"model": {"encoder": c["encoder"], "decoder": c["decoder"]}, "lr": c["lr"], "accumulation": 1} for c in _grid()
    ]
    scores = _additive(7)
    a = GuidedSearch(points, first_rung=2, seed=0, metric="score", mode="max")
    for k in range(30):
        cfg = a.suggest(f"t{k}")
        assert cfg is not None
        a.on_trial_result(f"t{k}", {"epoch": 1, "score": -1.0})  # not the first rung: ignored
        a.on_trial_result(f"t{k}", {"epoch": 2, "score": float(scores[points.index(cfg["cfg"])])})
    assert len(a.order.scores) == 30
    a.save(str(tmp_path / "s.pkl"))
    b = GuidedSearch(points, first_rung=2, seed=99, metric="score", mode="max")
    b.restore(str(tmp_path / "s.pkl"))
    assert [a.suggest(f"u{k}") for k in range(20)] == [b.suggest(f"u{k}") for k in range(20)]
    a.on_trial_complete("u0", None, error=True)
    assert a.order.scores[a.index["u0"]] == -np.inf


def test_longest_first_orders_by_cost_keeps_ties_and_puts_unknown_last() -> None:
    from geopose_ray.sweep.order import longest_first

    assert longest_first([1.0, 3.0, math.nan, 3.0, 2.0]) == [1, 3, 4, 0, 2]
    assert longest_first([]) == []


def test_the_tune_searcher_hands_out_the_costliest_finalists_fold_runs_first() -> None:
    """Three finalists at 2, 6 and 4 device hours per epoch (two epochs each): their fold runs come out t1's,
    t2's, then t0's, each finalist's folds in fold order; then FINISHED."""
    from ray.tune.search import Searcher

    from geopose_ray.cluster.search import GuidedSearch

    points = [{"model": {"encoder": e, "decoder": "Unet"}, "lr": 1e-4, "accumulation": 1} for e in ("a", "b", "c")]
    search = GuidedSearch(points, first_rung=1, seed=0, metric="score", mode="max", folds=[1, 2], top=2)
    ids = [f"t{k}" for k in range(3)]
    for t in ids:
        assert search.suggest(t) is not None
    for t, hours in zip(ids, (4.0, 12.0, 8.0), strict=True):
        search.on_trial_complete(t, {"epoch": 2, "score": 0.5, "device_hours": hours, "gpu_hours": hours})
    handed = [search.suggest(f"f{k}") for k in range(6)]
    assert [(h["cfg"]["_finalist"], h["cfg"]["val_fold"]) for h in handed] == [
        ("t1", 1), ("t1", 2), ("t2", 1), ("t2", 2), ("t0", 1), ("t0", 2)
    ]  # fmt: skip
    # Each carries its finalist's hours per epoch, which the scheduler ranks and pre-empts by.
    assert [h["cfg"]["_epoch_hours"] for h in handed] == [6.0, 6.0, 4.0, 4.0, 2.0, 2.0]
    assert search.suggest("f6") == Searcher.FINISHED


def test_a_fold_run_yields_only_to_a_costlier_architecture_with_half_as_many_hours_left_again() -> None:
    from geopose_ray.sweep.order import PREEMPT_RATIO, pre_empts

    assert PREEMPT_RATIO == 1.5
    # Running: 0.5 h an epoch, 10 h left. A costlier run with 15 h left is not enough; with 15.5 h it is.
    assert not pre_empts(0.5, 10.0, [(0.75, 15.0)])
    assert pre_empts(0.5, 10.0, [(0.75, 15.0), (0.75, 15.5)])
    # Never to an equally costly or cheaper one, however much it has left; an unknown cost pre-empts nothing.
    assert not pre_empts(0.5, 10.0, [(0.5, 100.0), (0.25, 100.0), (math.nan, 100.0)])
    assert not pre_empts(math.nan, 10.0, [(0.75, 100.0)])
    assert not pre_empts(0.5, 10.0, [])

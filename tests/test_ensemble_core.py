"""The ensemble's pure core: combination rules, the OOF objective against metrics, and each fitting step.

The synthetic worlds are tiny (8–16 px tiles) with planted structure: members = truth + independent noise, a
member of pure noise, a per-city AGL bias, a scale that is a function of (gsd, city).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import circmean

from geopose_ray.data.cache import Sample
from geopose_ray.data.layout import CITIES
from geopose_ray.ensemble import (
    EnsembleFit,
    OofStats,
    Prediction,
    apply_city_factors,
    apply_fit,
    blend_scale,
    combine,
    ensemble_scale,
    fit_city_factors,
    fit_ensemble,
    fit_scale_model,
    greedy_selection,
    least_squares_weights,
    normalise_weights,
    oof_report,
    oof_score,
    tile_oof,
    weighted_circular_mean,
    weighted_mean,
)
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.geometry import TWO_PI, angle_error
from geopose_ray.metrics import score_report, tile_stats

CITY_OFFSET = {"ARG": 0.0, "ATL": 0.8, "JAX": 0.3, "OMA": 1.4}


def planted_scale(gsd: float, city: str) -> float:
    """The truth scale of the synthetic worlds: a function of (gsd, city) only, pixels per metre."""
    return 1.0 + 4.0 * gsd + CITY_OFFSET[city]


@dataclass
class World:
    """Truth samples, their folds, and each member's OOF prediction of every tile."""

    samples: list[Sample]
    folds: list[int]
    members: dict[str, list[Prediction]]

    def stats(self) -> OofStats:
        return OofStats.from_tiles(
            tile_oof(s, f, {m: p[i] for m, p in self.members.items()})
            for i, (s, f) in enumerate(zip(self.samples, self.folds, strict=True))
        )

    def preds(self, i: int) -> dict[str, Prediction]:
        return {m: p[i] for m, p in self.members.items()}


def make_truth(rng: np.random.Generator, tiles: int, size: int, cities: Sequence[str], folds: int = 4) -> World:
    samples, fold = [], []
    for i in range(tiles):
        city = cities[i % len(cities)]
        agl = rng.gamma(2.0, 4.0, (size, size)).astype(np.float32)
        agl[rng.random((size, size)) < 0.1] = np.nan  # no-data pixels
        gsd = float(rng.uniform(0.3, 0.6))
        samples.append(
            Sample(
                stem=f"{city}_T{i:05d}",
                image=np.zeros((1, 1, 3), np.uint8),
                agl=agl,
                scale=planted_scale(gsd, city),
                angle=float(rng.uniform(0, TWO_PI)),
                gsd=gsd,
                city=CITIES.index(city),
            )
        )
        fold.append((i // len(cities)) % folds)  # city-stratified, as the manifest's folds are
    return World(samples, fold, {})


def noisy_member(
    world: World,
    rng: np.random.Generator,
    agl_noise: float = 1.0,
    scale_noise: float = 0.0,
    angle_noise: float = 0.0,
    agl_factor: Mapping[str, float] | None = None,
) -> list[Prediction]:
    """truth · factor(city) + independent noise; scale × (1 + noise); angle + noise (radians)."""
    out = []
    for s in world.samples:
        h = np.nan_to_num(s.agl, nan=0.0) * (agl_factor or {}).get(CITIES[s.city], 1.0)
        agl = (h + rng.normal(0, agl_noise, h.shape)).astype(np.float32)
        scale = s.scale * (1.0 + rng.normal(0, scale_noise))
        angle = float((s.angle + rng.normal(0, angle_noise)) % TWO_PI)
        out.append(Prediction(agl, float(scale), angle))
    return out


def pure_noise_member(world: World, rng: np.random.Generator) -> list[Prediction]:
    """Heights, scale and angle unrelated to the truth."""
    return [
        Prediction(
            rng.gamma(2.0, 8.0, s.agl.shape).astype(np.float32),
            float(rng.uniform(1, 5)),
            float(rng.uniform(0, TWO_PI)),
        )
        for s in world.samples
    ]


def metrics_score(world: World, predict: Callable[[int], Prediction]) -> float:
    """The challenge score, by metrics on full arrays, of ``predict(i)`` for every tile i."""
    stats = []
    for i, s in enumerate(world.samples):
        p = predict(i)
        stats.append(tile_stats(s.stem, CITIES[s.city], s.agl, s.scale, s.angle, p.agl, p.scale, p.angle))
    return score_report(stats).score


# --------------------------------------------------------------------------------------------------------------
# Combination rules

angles_st = st.lists(st.floats(-20.0, 20.0, allow_nan=False), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(angles_st)
def test_circular_mean_with_equal_weights_is_scipy_circmean(angles: list[float]) -> None:
    a = np.array(angles)
    # Where the directions nearly cancel the mean is ill-conditioned for any implementation.
    assume(np.hypot(np.sin(a).sum(), np.cos(a).sum()) > 1e-3 * len(a))
    ours = weighted_circular_mean(a)
    assert 0.0 <= ours < TWO_PI
    assert angle_error(ours, circmean(a)) < 1e-9
    assert angle_error(weighted_circular_mean(a, np.full(len(a), 3.7)), circmean(a)) < 1e-9


@settings(max_examples=200, deadline=None)
@given(angles_st, st.lists(st.integers(0, 4), min_size=8, max_size=8))
def test_integer_weights_equal_repeating_the_angles(angles: list[float], reps: list[int]) -> None:
    counts = np.array(reps[: len(angles)])
    assume(counts.sum() > 0)
    repeated = np.repeat(angles, counts)
    assume(np.hypot(np.sin(repeated).sum(), np.cos(repeated).sum()) > 1e-3 * len(repeated))
    assert angle_error(weighted_circular_mean(angles, counts), circmean(repeated)) < 1e-9


def test_circular_mean_wraps_where_a_plain_mean_fails() -> None:
    near_zero = [TWO_PI - 0.1, 0.1]
    assert abs(np.mean(near_zero) - math.pi) < 1e-12  # the plain mean points the opposite way
    assert angle_error(weighted_circular_mean(near_zero), 0.0) < 1e-12
    # Near ±π: the mean of 179° and -179° is 180°, not 0°.
    assert abs(weighted_circular_mean(np.radians([179.0, -179.0])) - math.pi) < 1e-12
    # Weights pull toward the heavier angle: 3 parts 350°, 1 part 10° → a bit below 355° (on the circle).
    m = math.degrees(float(weighted_circular_mean(np.radians([350.0, 10.0]), [3.0, 1.0])))
    assert 354.0 < m < 355.0
    # Several tiles at once: members on the first axis.
    many = weighted_circular_mean(np.array([[6.2, 3.0], [0.2, 3.2]]), [1.0, 1.0])
    assert many.shape == (2,)
    assert abs(many[0] - (6.2 - TWO_PI + 0.2) / 2) < 1e-12  # the short arc through 0
    assert abs(many[1] - 3.1) < 1e-12


def test_normalise_weights_and_its_errors() -> None:
    np.testing.assert_allclose(normalise_weights([2.0, 0.0, 6.0]), [0.25, 0.0, 0.75])
    for bad in ([-1.0, 2.0], [0.0, 0.0], [math.nan, 1.0], [math.inf, 1.0], []):
        with pytest.raises(ConfigError, match="weights"):
            normalise_weights(bad)
    with pytest.raises(ConfigError, match="3 members"):
        normalise_weights([1.0, 1.0], 3)


def test_combine_weights_agl_and_scale_and_ignores_zero_weight_members() -> None:
    a = Prediction(np.full((2, 3), 2.0, np.float32), 1.0, 0.1)
    b = Prediction(np.full((2, 3), 6.0, np.float32), 3.0, TWO_PI - 0.1)
    broken = Prediction(np.full((2, 3), np.nan, np.float32), math.nan, math.nan)
    out = combine([a, b, broken], [3.0, 1.0, 0.0])
    assert out.agl.dtype == np.float32
    np.testing.assert_array_equal(out.agl, np.full((2, 3), 3.0, np.float32))
    assert out.scale == pytest.approx(1.5)
    assert angle_error(out.angle, math.atan2(2 * math.sin(0.1), 4 * math.cos(0.1))) < 1e-12
    # NaN in a member with weight propagates (a pixel is unusable), never silently dropped.
    assert np.isnan(weighted_mean([np.array([1.0]), np.array([np.nan])], [1.0, 1.0])).all()
    with pytest.raises(DataError, match="different shapes"):
        combine([a, Prediction(np.zeros((3, 3), np.float32), 1.0, 0.0)])
    with pytest.raises(ConfigError, match="at least one"):
        combine([])


def test_city_factors_and_scale_blend() -> None:
    p = Prediction(np.full((2, 2), 10.0, np.float32), 2.0, 1.0)
    q = apply_city_factors(p, "JAX", {"JAX": 1.25, "ARG": 0.5})
    np.testing.assert_array_equal(q.agl, np.full((2, 2), 12.5, np.float32))
    assert (q.scale, q.angle) == (2.0, 1.0)
    assert apply_city_factors(p, "ATL", {"JAX": 1.25}) is p
    with pytest.raises(ConfigError, match="one of"):
        apply_city_factors(p, "XYZ", {})
    with pytest.raises(ConfigError, match="one of"):
        apply_city_factors(p, "JAX", {"jax": 1.1})
    assert float(blend_scale(2.0, 4.0, 0.25)) == pytest.approx(2.5)
    with pytest.raises(ConfigError, match="scale_blend"):
        blend_scale(2.0, 4.0, 1.5)


# --------------------------------------------------------------------------------------------------------------
# The objective is the challenge score


def test_oof_score_is_metrics_score_of_the_combined_predictions() -> None:
    rng = np.random.default_rng(1)
    world = make_truth(rng, 20, 16, ["ARG", "JAX", "OMA"])
    world.members = {
        "a": noisy_member(world, rng, 1.0, 0.1, 0.2),
        "b": noisy_member(world, rng, 2.0, 0.2, 0.5, {"JAX": 0.8}),
        "c": noisy_member(world, rng, 3.0, 0.3, 1.0),
    }
    stats = world.stats()
    w = np.array([0.5, 0.3, 0.2])
    factors = {"JAX": 1.2, "OMA": 0.9}
    scale = rng.uniform(1.0, 5.0, len(world.samples))

    def combined(i: int) -> Prediction:
        p = apply_city_factors(combine(list(world.preds(i).values()), w), CITIES[world.samples[i].city], factors)
        return Prediction(p.agl, float(scale[i]), p.angle)

    expected = metrics_score(world, combined)
    assert 0.0 < expected < 0.99
    assert oof_score(stats, w, factors, scale) == pytest.approx(expected, abs=1e-9)
    # Without the scale override the ensemble's scale is the weighted mean of the members'.
    plain = metrics_score(world, lambda i: combine(list(world.preds(i).values()), w))
    assert oof_score(stats, w) == pytest.approx(plain, abs=1e-9)
    assert oof_score(stats, w) != pytest.approx(expected, abs=1e-3)  # the arguments matter
    # The per-tile report agrees with metrics on every diagnostic.
    report = oof_report(stats, w, factors, scale)
    ref = score_report(
        tile_stats(s.stem, CITIES[s.city], s.agl, s.scale, s.angle, combined(i).agl, scale[i], combined(i).angle)
        for i, s in enumerate(world.samples)
    )
    assert report.score == pytest.approx(ref.score, abs=1e-9)
    for c, r in ref.cities.items():
        got = report.cities[c]
        assert got.pixels == r.pixels
        for k in ("agl_r2", "flow_r2", "angle_err_mean_deg", "scale_err_mean", "agl_rmse_m", "epe_rmse_px"):
            assert getattr(got, k) == pytest.approx(getattr(r, k), rel=1e-6, abs=1e-9), (c, k)


def test_tile_oof_rejects_bad_member_predictions() -> None:
    rng = np.random.default_rng(2)
    world = make_truth(rng, 2, 8, ["ARG"])
    s = world.samples[0]
    good = Prediction(np.nan_to_num(s.agl), s.scale, s.angle)
    bad = np.nan_to_num(s.agl)
    bad[np.isfinite(s.agl).nonzero()[0][0], np.isfinite(s.agl).nonzero()[1][0]] = np.nan
    with pytest.raises(DataError, match="'b' predicted non-finite heights"):
        tile_oof(s, 0, {"a": good, "b": Prediction(bad, s.scale, s.angle)})
    with pytest.raises(DataError, match="'b' predicted AGL of shape"):
        tile_oof(s, 0, {"a": good, "b": Prediction(np.zeros((4, 4), np.float32), 1.0, 0.0)})
    with pytest.raises(DataError, match="'b' predicted scale nan"):
        tile_oof(s, 0, {"a": good, "b": Prediction(good.agl, math.nan, 0.0)})
    # NaN predictions where the truth has no data are harmless.
    nodata = np.where(np.isfinite(s.agl), s.agl, np.nan).astype(np.float32)
    assert tile_oof(s, 0, {"a": Prediction(nodata, s.scale, s.angle)}).err_gram[0, 0] == 0.0
    t0 = tile_oof(world.samples[0], 0, {"a": good})
    t1 = tile_oof(world.samples[1], 1, {"z": good})
    with pytest.raises(DataError, match="every member must predict every training tile"):
        OofStats.from_tiles([t0, t1])
    with pytest.raises(DataError, match="given twice"):
        OofStats.from_tiles([t0, t0])


def test_member_order_and_selection() -> None:
    rng = np.random.default_rng(3)
    world = make_truth(rng, 8, 8, ["ARG", "ATL"])
    world.members = {"a": noisy_member(world, rng, 1.0, 0.1, 0.1), "b": noisy_member(world, rng, 2.0, 0.2, 0.3)}
    stats = world.stats()
    # Tiles may list their members in any order; statistics follow the first tile's order.
    tiles = [
        tile_oof(s, f, dict(reversed(list(world.preds(i).items())))) if i % 2 else tile_oof(s, f, world.preds(i))
        for i, (s, f) in enumerate(zip(world.samples, world.folds, strict=True))
    ]
    mixed = OofStats.from_tiles(tiles)
    assert mixed.members == ("a", "b")
    assert oof_score(mixed, [0.7, 0.3]) == pytest.approx(oof_score(stats, [0.7, 0.3]), abs=1e-12)
    only_b = stats.select(["b"])
    assert oof_score(only_b, [1.0]) == pytest.approx(oof_score(stats, [0.0, 1.0]), abs=1e-12)
    with pytest.raises(ConfigError, match="must be some of"):
        stats.select(["c"])


# --------------------------------------------------------------------------------------------------------------
# Weights


@pytest.fixture(scope="module")
def complementary() -> tuple[World, OofStats]:
    """Members with independent errors (a a bit better than b), pure noise, and a worse version of a."""
    rng = np.random.default_rng(4)
    world = make_truth(rng, 24, 16, ["ARG", "ATL", "JAX", "OMA"])
    a = noisy_member(world, rng, 3.0, 0.1, 0.2)
    world.members = {
        "noise": pure_noise_member(world, rng),
        "b": noisy_member(world, rng, 3.2, 0.1, 0.2),
        "a": a,
        "a_worse": [  # a's errors, amplified by 1.5
            Prediction((1.5 * p.agl - 0.5 * np.nan_to_num(s.agl)).astype(np.float32), p.scale, p.angle)
            for p, s in zip(a, world.samples, strict=True)
        ],
    }
    return world, world.stats()


def test_greedy_starts_from_the_best_member_and_adds_the_complementary_one(
    complementary: tuple[World, OofStats],
) -> None:
    _, stats = complementary
    assert stats.members == ("noise", "b", "a", "a_worse")
    single = {m: oof_score(stats, np.eye(4)[i]) for i, m in enumerate(stats.members)}
    pair = oof_score(stats, [0.0, 0.5, 0.5, 0.0])
    assert pair > single["a"] > single["b"] > single["noise"]  # the premise of the test
    fit = greedy_selection(stats, max_rounds=20)
    assert fit.steps[0] == ("best single model a", pytest.approx(single["a"]))
    assert fit.steps[1][0] == "+ b"
    assert fit.weights[0] == 0.0  # pure noise never picked
    assert fit.weights[3] == 0.0  # nor a worse version of a member already in
    assert fit.weights[1] > 0.3 and fit.weights[2] > 0.3
    assert fit.weights.sum() == pytest.approx(1.0) and (fit.weights >= 0).all()
    assert fit.score >= pair
    assert [s for _, s in fit.steps] == sorted(s for _, s in fit.steps)  # every kept pick raised the score
    assert fit.score == pytest.approx(oof_score(stats, fit.weights), abs=1e-12)
    # One round is only the best single member.
    assert greedy_selection(stats, max_rounds=1).weights.tolist() == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="max_rounds >= 1"):
        greedy_selection(stats, max_rounds=0)


def test_greedy_picks_a_member_again_when_repeating_it_helps() -> None:
    rng = np.random.default_rng(10)
    world = make_truth(rng, 16, 16, ["ATL", "OMA"])
    # Independent errors of σ 1 and 1.3: the best weighting is about (0.63, 0.37), which 2 a + 1 b reaches.
    world.members = {"a": noisy_member(world, rng, 1.0), "b": noisy_member(world, rng, 1.3)}
    fit = greedy_selection(world.stats(), max_rounds=3)
    assert [name for name, _ in fit.steps] == ["best single model a", "+ b", "+ a"]
    np.testing.assert_allclose(fit.weights, [2 / 3, 1 / 3])


def test_least_squares_weights_are_inverse_variance_on_independent_errors(
    complementary: tuple[World, OofStats],
) -> None:
    _, stats = complementary
    fit = least_squares_weights(stats)
    w = dict(zip(stats.members, fit.weights, strict=True))
    assert fit.weights.sum() == pytest.approx(1.0) and (fit.weights >= 0).all()
    # A worse version of a adds only error correlated with a's: exactly 0.
    assert w["a_worse"] == 0.0
    # Independent errors of variances 3.2² and 3.0²: a gets 3.2² / (3.0² + 3.2²) of their total.
    assert w["a"] / (w["a"] + w["b"]) == pytest.approx(3.2**2 / (3.0**2 + 3.2**2), abs=0.03)
    # Pure noise also has an independent error, of far larger variance: a small, not a zero, weight.
    assert 0.0 < w["noise"] < 0.05
    assert fit.score == pytest.approx(oof_score(stats, fit.weights), abs=1e-12)

    # It is the minimum of its objective (the mean AGL R² over cities): nudging the weights only lowers it.
    def agl_r2(weights: np.ndarray) -> float:
        return float(np.mean([c.agl_r2 for c in oof_report(stats, weights).cities.values()]))

    best = agl_r2(fit.weights)
    nudges = [np.array(d) for d in ([0, 0.02, -0.02, 0], [0.01, 0, -0.01, 0], [0, 0, -0.01, 0.01], [0.01, -0.01, 0, 0])]
    tried = 0
    for d in nudges:
        for moved in (fit.weights + d, fit.weights - d):
            if (moved >= 0).all():
                tried += 1
                assert agl_r2(moved) < best
    assert tried >= 6


def test_fit_ensemble_keeps_the_better_weighting(complementary: tuple[World, OofStats]) -> None:
    _, stats = complementary
    fit = fit_ensemble(stats, city_factors=False, scale_model=False)
    assert fit.weights["a_worse"] == 0.0
    assert set(fit.candidates) == {"greedy", "least_squares"}
    assert fit.score == pytest.approx(max(fit.candidates.values()))
    assert fit.method == max(fit.candidates, key=fit.candidates.__getitem__)
    # Least squares wins here (the small noise weight pays); it follows the greedy steps in the progression.
    assert fit.method == "least_squares"
    assert [p[0] for p in fit.progression] == ["best single model a", "+ b", "constrained least squares weights"]
    assert fit.rejected == []
    greedy_only = fit_ensemble(stats, city_factors=False, scale_model=False, min_gain=0.01)
    assert greedy_only.method == "greedy" and greedy_only.rejected[0][0] == "constrained least squares weights"
    assert set(fit.active_members) == {m for m, v in fit.weights.items() if v > 0}
    assert fit.score == pytest.approx(oof_score(stats, list(fit.weights.values())), abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# City factors


def test_city_factors_recover_a_planted_bias() -> None:
    rng = np.random.default_rng(5)
    world = make_truth(rng, 24, 16, ["ARG", "JAX", "OMA"])
    world.members = {
        "a": noisy_member(world, rng, 0.3, 0.0, 0.0, {"JAX": 0.8}),
        "b": noisy_member(world, rng, 0.3, 0.0, 0.0, {"JAX": 0.8}),
    }
    stats = world.stats()
    factors = fit_city_factors(stats, [0.5, 0.5], xatol=1e-5)
    assert set(factors) == {"ARG", "JAX", "OMA"}
    assert factors["JAX"] == pytest.approx(1.25, abs=0.01)
    assert factors["ARG"] == pytest.approx(1.0, abs=0.01)
    assert factors["OMA"] == pytest.approx(1.0, abs=0.01)
    fit = fit_ensemble(stats, scale_model=False)
    assert fit.city_factors["JAX"] == pytest.approx(1.25, abs=0.01)
    assert fit.progression[-1][0].startswith("city factors")
    assert fit.progression[-1][1] > fit.progression[-2][1] + 0.01
    # A bound that excludes the planted factor stops at the bound.
    assert fit_city_factors(stats, [0.5, 0.5], bounds=(0.9, 1.1))["JAX"] == pytest.approx(1.1, abs=1e-3)
    with pytest.raises(ConfigError, match="factor_bounds"):
        fit_city_factors(stats, [0.5, 0.5], bounds=(1.1, 1.5))


# --------------------------------------------------------------------------------------------------------------
# Scale model


@pytest.fixture(scope="module")
def noisy_scale() -> tuple[World, OofStats]:
    """Scale = f(gsd, city) exactly; the members' scales are off by 25 % (independently per tile)."""
    rng = np.random.default_rng(6)
    world = make_truth(rng, 120, 8, list(CITIES))
    world.members = {
        "a": noisy_member(world, rng, 1.0, 0.25, 0.1, {"OMA": 0.85}),
        "b": noisy_member(world, rng, 1.0, 0.25, 0.1, {"OMA": 0.85}),
    }
    return world, world.stats()


def test_scale_model_recovers_a_planted_scale(noisy_scale: tuple[World, OofStats]) -> None:
    world, stats = noisy_scale
    w = [0.5, 0.5]
    sf = fit_scale_model(stats, w)
    assert sf.blend > 0.5
    assert sf.score > oof_score(stats, w) + 0.01
    truth = np.array([s.scale for s in world.samples])
    model_err = np.abs(sf.oof_scale - truth).mean()
    assert model_err < 0.5 * np.abs(ensemble_scale(stats, w) - truth).mean()
    # The final model, trained on every tile, predicts the planted function.
    cities = [CITIES[s.city] for s in world.samples]
    np.testing.assert_allclose(sf.model.predict(stats.gsd, cities), truth, rtol=0.05)
    fit = fit_ensemble(stats)
    assert [p[0].split(" ")[0] for p in fit.progression[-2:]] == ["city", "XGBoost"]
    assert fit.scale_model is not None
    assert fit.scale_blend == fit_scale_model(stats, list(fit.weights.values()), fit.city_factors).blend


def test_scale_model_is_rejected_when_member_scales_are_exact() -> None:
    rng = np.random.default_rng(7)
    world = make_truth(rng, 40, 8, list(CITIES))
    # Exact scales and angles; small AGL errors (noisy heights alone make a slightly lower scale pay off).
    world.members = {"a": noisy_member(world, rng, 0.2), "b": noisy_member(world, rng, 0.3)}
    stats = world.stats()
    sf = fit_scale_model(stats, [0.5, 0.5])
    assert sf.blend == 0.0
    assert sf.score == pytest.approx(oof_score(stats, [0.5, 0.5]), abs=1e-12)
    fit = fit_ensemble(stats)
    assert fit.scale_model is None and fit.scale_blend == 0.0
    assert any(name.startswith("XGBoost") for name, _ in fit.rejected)
    assert not any(name.startswith("XGBoost") for name, _ in fit.progression)


def test_steps_that_do_not_improve_are_not_kept() -> None:
    rng = np.random.default_rng(8)
    world = make_truth(rng, 16, 8, ["ATL", "JAX"])
    world.members = {"a": noisy_member(world, rng, 0.0), "b": noisy_member(world, rng, 0.0)}  # exact members
    fit = fit_ensemble(world.stats())
    assert fit.progression == [("best single model a", pytest.approx(1.0, abs=1e-9))]
    assert fit.city_factors == {} and fit.scale_model is None
    assert {name.split(" ")[0] for name, _ in fit.rejected} == {"constrained", "city", "XGBoost"}
    # A large min_gain keeps nothing beyond the best single member, however much a step helps.
    _, stats = make_bias_world()
    strict = fit_ensemble(stats, min_gain=0.5)
    assert len(strict.progression) == 1 and strict.city_factors == {} and strict.scale_model is None
    assert strict.weights == {"a": 1.0, "b": 0.0} or strict.weights == {"a": 0.0, "b": 1.0}


def make_bias_world() -> tuple[World, OofStats]:
    rng = np.random.default_rng(9)
    world = make_truth(rng, 40, 8, list(CITIES))
    world.members = {
        "a": noisy_member(world, rng, 1.0, 0.25, 0.1, {"ARG": 1.3}),
        "b": noisy_member(world, rng, 2.0, 0.25, 0.3, {"ARG": 1.3}),
    }
    return world, world.stats()


# --------------------------------------------------------------------------------------------------------------
# Applying a fit


def test_apply_fit_scores_what_the_fit_reports() -> None:
    world, stats = make_bias_world()
    fit = fit_ensemble(stats, scale_model=False)
    assert fit.city_factors and fit.score > fit.progression[0][1]
    got = metrics_score(world, lambda i: apply_fit(fit, world.preds(i), CITIES[world.samples[i].city], 0.4))
    assert got == pytest.approx(fit.score, abs=1e-9)
    assert fit.oof_report["score"] == pytest.approx(fit.score, abs=1e-9)


def test_json_round_trip_gives_identical_predictions(noisy_scale: tuple[World, OofStats]) -> None:
    world, stats = noisy_scale
    fit = fit_ensemble(stats)
    assert fit.scale_model is not None and fit.city_factors
    back = EnsembleFit.from_json(fit.to_json())
    for k in ("weights", "method", "city_factors", "scale_model", "scale_blend", "progression", "rejected"):
        assert getattr(back, k) == getattr(fit, k), k
    for i in range(0, len(world.samples), 7):
        s = world.samples[i]
        p, q = (apply_fit(f, world.preds(i), CITIES[s.city], s.gsd) for f in (fit, back))
        np.testing.assert_array_equal(p.agl, q.agl)
        assert (p.scale, p.angle) == (q.scale, q.angle)
    # The scale model is in use: the scale is not the members' weighted mean.
    s = world.samples[0]
    plain = combine(list(world.preds(0).values()), list(fit.weights.values()))
    assert apply_fit(back, world.preds(0), CITIES[s.city], s.gsd).scale != pytest.approx(plain.scale, rel=1e-6)


def test_apply_fit_and_loading_errors(noisy_scale: tuple[World, OofStats]) -> None:
    world, stats = noisy_scale
    fit = fit_ensemble(stats, scale_model=False, city_factors=False)
    with pytest.raises(ConfigError, match="no prediction of member"):
        apply_fit(fit, {"zzz": world.preds(0)["a"]}, "ARG", 0.4)
    d = fit.to_dict()
    with pytest.raises(DataError, match="format"):
        EnsembleFit.from_dict({**d, "format": 99})
    with pytest.raises(DataError, match="summing to 1"):
        EnsembleFit.from_dict({**d, "weights": {"a": 0.7, "b": 0.7}})
    with pytest.raises(DataError, match="malformed"):
        EnsembleFit.from_dict({k: v for k, v in d.items() if k != "weights"})
    with pytest.raises(DataError, match="not valid JSON"):
        EnsembleFit.from_json("{")

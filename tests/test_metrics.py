"""The challenge score: package vs. a naive reference; hand cases, failures, diagnostics, Moments.

The naive reference lives in ``tests/reference_score.py`` so that ``test_scoring.py`` can reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_score import RefReport, RefTile, reference_score

from geopose_ray.geometry import TWO_PI
from geopose_ray.metrics import EPS, Moments, ScoreReport, TileStats, score_report, tile_stats

CITY_NAMES = ("ARG", "ATL", "JAX", "OMA")
NAN = math.nan


def stats_of(t: RefTile) -> TileStats:
    """The package's reduction of one reference tile."""
    return tile_stats(t.stem, t.city, t.agl_true, t.scale_true, t.angle_true, t.agl_pred, t.scale_pred, t.angle_pred)


def package_report(tiles: Sequence[RefTile]) -> ScoreReport:
    return score_report([stats_of(t) for t in tiles])


def assert_matches_reference(report: ScoreReport, ref: RefReport, tol: float = 1e-6) -> None:
    """Every city's agl_r2, flow_r2, score and pixel count, and the final score, agree to ``tol`` absolute."""
    assert sorted(report.cities) == sorted(ref.cities)
    for city, r in ref.cities.items():
        c = report.cities[city]
        assert c.pixels == r.pixels, city
        assert bool(c.failures) == r.failed, city
        assert c.agl_r2 == pytest.approx(r.agl_r2, abs=tol), city
        assert c.flow_r2 == pytest.approx(r.flow_r2, abs=tol), city
        assert c.score == pytest.approx(r.score, abs=tol), city
    if math.isnan(ref.score):  # no city has truth
        assert math.isnan(report.score)
    else:
        assert report.score == pytest.approx(ref.score, abs=tol)


# ----------------------------------------------------------------------------------------------------
# (a) a hand-computed case
# ----------------------------------------------------------------------------------------------------


def hand_tiles() -> list[RefTile]:
    """City JAX: two 2x2 tiles, one NaN truth pixel, one NaN prediction pixel. City OMA: one perfect tile."""
    return [
        # JAX tile A: s=1, θ=0 → v = (0, h). Truth NaN at (1,1) (pred 5 there is ignored); pred NaN at (0,1).
        RefTile(
            "JAX_AAAAAA", "JAX",
            np.array([[1.0, 5.0], [3.0, NAN]]), 1.0, 0.0,
            np.array([[1.0, NAN], [2.0, 5.0]]), 1.0, 0.0,
        ),
        # JAX tile B: s=2, θ=π/2 → v = (2h, 0); predicted s=1, θ=π/2 → v̂ = (ĥ, 0).
        RefTile(
            "JAX_BBBBBB", "JAX",
            np.array([[4.0, 0.0], [2.0, 2.0]]), 2.0, math.pi / 2,
            np.array([[3.0, 1.0], [2.0, 2.0]]), 1.0, math.pi / 2,
        ),
        # OMA: perfect prediction (the value under the NaN truth pixel does not matter).
        RefTile(
            "OMA_CCCCCC", "OMA",
            np.array([[0.0, 10.0], [NAN, 20.0]]), 0.5, 1.0,
            np.array([[0.0, 10.0], [7.0, 20.0]]), 0.5, 1.0,
        ),
    ]  # fmt: skip


def test_hand_case_exact_values() -> None:
    """A hand-worked example; each number below breaks under a plausible wrong implementation.

    JAX valid truth heights (7 pixels): A: 1, 5, 3; B: 4, 0, 2, 2.
      n = 7, Σh = 17, Σh² = 1 + 25 + 9 + 16 + 0 + 4 + 4 = 59
      mean_h = 17 / (7 + 1e-4);  total_h = Σ(h − mean_h)² = 59 − 2·17·mean_h + 7·mean_h²   (≈ 17.714)
      (dropping the NaN-prediction pixel h=5 from the totals would give 34 − 144/6 = 10 instead)
    AGL errors (truth-valid pixels with a finite prediction, 6 of them):
      A: (1−1)² = 0, (2−3)² = 1 [the h=5 pixel has a NaN prediction: dropped, NOT counted as ĥ=0 (25)]
      B: (3−4)² = 1, (1−0)² = 1, 0, 0                                       → Σ(ĥ−h)² = 3
    Truth flow components (2n = 14 values), A: v = (0, h); B: v = (2h, 0):
      x: 0, 0, 0, 8, 0, 4, 4   y: 1, 5, 3, 0, 0, 0, 0
      Σ(v_x + v_y) = 25, Σv² = 1 + 25 + 9 + 64 + 16 + 16 = 131
      mean_v = 25 / (14 + 1e-4);  total_v = 131 − 2·25·mean_v + 14·mean_v²   (≈ 86.357)
      (per-component means would give 59.43 + 23.43 = 82.86; dividing by n instead of 2n gives 131)
    Flow errors ‖v̂ − v‖²: A: v̂ = (0, ĥ): 0, (2−3)² = 1; B: v̂ = (ĥ, 0): 25, 1, 4, 4 → Σ = 35
    R²_h = 1 − 3 / (total_h + 1e-4),  R²_v = 1 − 35 / (total_v + 1e-4),  score_JAX = (R²_h + R²_v) / 2.
    OMA is perfect: both sums of errors are 0, so R² = 1 exactly. Final = (score_JAX + 1) / 2.
    """
    mean_h = 17 / (7 + 1e-4)
    total_h = 59 - 2 * 17 * mean_h + 7 * mean_h**2
    mean_v = 25 / (14 + 1e-4)
    total_v = 131 - 2 * 25 * mean_v + 14 * mean_v**2
    r2_h = 1 - 3 / (total_h + 1e-4)
    r2_v = 1 - 35 / (total_v + 1e-4)
    jax = (r2_h + r2_v) / 2
    assert r2_h == pytest.approx(0.83064612, abs=1e-8)  # sanity of the arithmetic above
    assert r2_v == pytest.approx(0.59470684, abs=1e-8)

    report = package_report(hand_tiles())
    c = report.cities["JAX"]
    assert c.tiles == 2
    assert c.pixels == 7
    assert c.failures == []
    assert c.agl_r2 == pytest.approx(r2_h, abs=1e-12)
    assert c.flow_r2 == pytest.approx(r2_v, abs=1e-12)
    assert c.score == pytest.approx(jax, abs=1e-12)
    assert c.agl_rmse_m == pytest.approx(math.sqrt(3 / 6), abs=1e-12)
    assert c.epe_rmse_px == pytest.approx(math.sqrt(35 / 6), abs=1e-12)
    o = report.cities["OMA"]
    assert (o.agl_r2, o.flow_r2, o.score) == (1.0, 1.0, 1.0)
    assert o.pixels == 3
    assert report.score == pytest.approx((jax + 1.0) / 2, abs=1e-12)

    # and the naive reference agrees with the hand numbers too
    ref = reference_score(hand_tiles())
    assert ref.cities["JAX"].agl_r2 == pytest.approx(r2_h, abs=1e-12)
    assert ref.cities["JAX"].flow_r2 == pytest.approx(r2_v, abs=1e-12)
    assert ref.score == pytest.approx((jax + 1.0) / 2, abs=1e-12)


def test_hand_case_eps_in_mean_matters() -> None:
    """The damped mean Σh/(n+1e-4) is not the plain mean: the totals differ by n·(mean − damped)² ≈ 1e-8."""
    plain_total_h = 59 - 17**2 / 7
    damped = 17 / (7 + 1e-4)
    damped_total_h = 59 - 2 * 17 * damped + 7 * damped**2
    assert damped_total_h - plain_total_h > 1e-9
    r2_plain = 1 - 3 / (plain_total_h + 1e-4)
    r2_damped = 1 - 3 / (damped_total_h + 1e-4)
    got = package_report(hand_tiles()).cities["JAX"].agl_r2
    assert abs(got - r2_damped) < 1e-13
    assert abs(got - r2_plain) > 1e-11


def test_hand_case_is_pooled_not_per_tile() -> None:
    """Pooling all pixels of a city is not the mean of per-tile R² (nor of per-tile scores)."""
    tiles = hand_tiles()[:2]
    pooled = package_report(tiles).cities["JAX"].score
    per_tile = [package_report([t]).cities["JAX"].score for t in tiles]
    assert abs(pooled - sum(per_tile) / 2) > 0.01


# ----------------------------------------------------------------------------------------------------
# (b) random multi-tile, multi-city inputs vs. the naive reference
# ----------------------------------------------------------------------------------------------------


def random_tile(
    rng: np.random.Generator,
    stem: str,
    city: str,
    shape: tuple[int, int],
    max_h: float,
    nan_truth: float,
    nan_pred: float,
    mode: str,
) -> RefTile:
    """Truth heights in [0, max_h] with ground zeros and NaN holes; a prediction by ``mode``."""
    h = rng.uniform(0.0, max_h, shape)
    h[rng.random(shape) < 0.3] = 0.0
    h[rng.random(shape) < nan_truth] = NAN
    scale = float(rng.uniform(0.1, 5.0))
    angle = float(rng.uniform(0.0, TWO_PI))
    if mode == "exact":
        p, s_p, a_p = np.where(np.isnan(h), 1.0, h), scale, angle
    elif mode == "noisy":
        p = h + rng.normal(0.0, 0.1 * max_h, shape)
        s_p = scale * float(rng.uniform(0.7, 1.3))
        a_p = angle + float(rng.normal(0.0, 0.5))  # may leave [0, 2π): the score must not care
    else:  # unrelated
        p = rng.uniform(0.0, max_h, shape)
        s_p, a_p = float(rng.uniform(0.1, 5.0)), float(rng.uniform(-TWO_PI, 2 * TWO_PI))
    p = np.asarray(p, dtype=np.float64)
    p[rng.random(shape) < nan_pred] = NAN
    return RefTile(stem, city, h, scale, angle, p, s_p, a_p)


def random_scene(
    seed: int,
    n_cities: int,
    tiles_per_city: int,
    shape: tuple[int, int],
    max_h: float,
    nan_truth: float,
    nan_pred: float,
    mode: str,
    failure: str | None = None,
) -> list[RefTile]:
    """Tiles of ``n_cities`` cities, interleaved; optionally one tile fails by ``failure``."""
    rng = np.random.default_rng(seed)
    cities = [str(c) for c in rng.permutation(CITY_NAMES)[:n_cities]]
    tiles = []
    for i in range(tiles_per_city):
        for city in cities:
            # vary the holes per tile: some tiles fully valid, some fully NaN
            nt = float(rng.choice([0.0, nan_truth, nan_truth, 1.0 if nan_truth > 0 else 0.0]))
            tiles.append(random_tile(rng, f"{city}_T{i:05d}", city, shape, max_h, nt, nan_pred, mode))
    if failure is not None:
        k = int(rng.integers(len(tiles)))
        t = tiles[k]
        if failure == "missing":
            tiles[k] = RefTile(t.stem, t.city, t.agl_true, t.scale_true, t.angle_true, None, NAN, NAN)
        elif failure == "nan_scale":
            tiles[k] = RefTile(t.stem, t.city, t.agl_true, t.scale_true, t.angle_true, t.agl_pred, NAN, 1.0)
        elif failure == "nan_angle":
            tiles[k] = RefTile(t.stem, t.city, t.agl_true, t.scale_true, t.angle_true, t.agl_pred, 1.0, NAN)
        else:  # wrong shape
            bad = np.zeros((t.agl_true.shape[0] + 1, t.agl_true.shape[1]))
            tiles[k] = RefTile(t.stem, t.city, t.agl_true, t.scale_true, t.angle_true, bad, 1.0, 1.0)
    return tiles


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_cities=st.integers(1, 4),
    tiles_per_city=st.integers(1, 6),
    shape=st.sampled_from([(1, 1), (2, 3), (4, 4), (7, 5)]),
    max_h=st.sampled_from([0.5, 30.0, 200.0]),
    nan_truth=st.sampled_from([0.0, 0.2, 0.6]),
    nan_pred=st.sampled_from([0.0, 0.2, 0.9]),
    mode=st.sampled_from(["exact", "noisy", "unrelated"]),
    failure=st.sampled_from([None, None, None, "missing", "nan_scale", "nan_angle", "shape"]),
)
def test_score_matches_naive_reference(
    seed: int,
    n_cities: int,
    tiles_per_city: int,
    shape: tuple[int, int],
    max_h: float,
    nan_truth: float,
    nan_pred: float,
    mode: str,
    failure: str | None,
) -> None:
    """Pooled per-city R² (AGL and flow), city scores and final score equal the literal formula to 1e-6."""
    tiles = random_scene(seed, n_cities, tiles_per_city, shape, max_h, nan_truth, nan_pred, mode, failure)
    assert_matches_reference(package_report(tiles), reference_score(tiles))


@pytest.mark.parametrize("mode", ["noisy", "unrelated"])
def test_score_matches_reference_many_tiles(mode: str) -> None:
    """Hundreds of tiles per city with heights up to 200 m: pooling loses no precision (1e-6 absolute)."""
    tiles = random_scene(7, 4, 250, (4, 4), 200.0, 0.2, 0.2, mode)
    report = package_report(tiles)
    assert_matches_reference(report, reference_score(tiles))
    assert all(c.tiles == 250 for c in report.cities.values())


def test_score_independent_of_tile_order() -> None:
    """Shuffling the tiles (as a parallel map might) does not change the report beyond rounding."""
    tiles = random_scene(3, 3, 20, (3, 3), 200.0, 0.2, 0.2, "noisy")
    a = package_report(tiles)
    b = package_report([tiles[i] for i in np.random.default_rng(0).permutation(len(tiles))])
    assert b.score == pytest.approx(a.score, abs=1e-12)
    for city in a.cities:
        assert b.cities[city].score == pytest.approx(a.cities[city].score, abs=1e-12)


def test_nan_prediction_pixels_stay_in_totals() -> None:
    """Making prediction pixels NaN changes only the error sums: the totals (the denominators) keep them.

    With all predictions NaN the errors are 0, so R² = 1 exactly for both terms, while ``pixels`` still counts
    every valid truth pixel.
    """
    tiles = random_scene(11, 2, 5, (4, 4), 200.0, 0.2, 1.0, "noisy")
    report = package_report(tiles)
    assert_matches_reference(report, reference_score(tiles))
    for c in report.cities.values():
        assert (c.agl_r2, c.flow_r2) == (1.0, 1.0)
        assert c.pixels == sum(int(np.isfinite(t.agl_true).sum()) for t in tiles if t.city == c.city)
        assert math.isnan(c.agl_rmse_m)


# ----------------------------------------------------------------------------------------------------
# (c) failures score their city 0 and leave the other cities alone
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred_none", "scale_pred", "angle_pred", "reason"),
    [
        (True, NAN, NAN, "missing"),
        (False, NAN, 1.0, "not finite"),
        (False, 2.0, NAN, "not finite"),
        (False, math.inf, 1.0, "not finite"),
        (False, 2.0, -math.inf, "not finite"),
    ],
)
def test_failure_scores_city_zero(pred_none: bool, scale_pred: float, angle_pred: float, reason: str) -> None:
    """One unusable tile makes its city's score exactly 0, is listed by stem; other cities are unchanged."""
    tiles = random_scene(5, 3, 4, (4, 4), 200.0, 0.1, 0.1, "noisy")
    victim = next(i for i, t in enumerate(tiles) if t.city == tiles[0].city)
    t = tiles[victim]
    bad = RefTile(
        t.stem, t.city, t.agl_true, t.scale_true, t.angle_true,
        None if pred_none else t.agl_pred, scale_pred, angle_pred,
    )  # fmt: skip
    broken = [*tiles[:victim], bad, *tiles[victim + 1 :]]
    good = package_report(tiles)
    report = package_report(broken)

    c = report.cities[t.city]
    assert c.score == 0.0
    assert c.agl_r2 == 0.0 and c.flow_r2 == 0.0
    assert len(c.failures) == 1
    assert c.failures[0].startswith(f"{t.stem}: ")
    assert reason in c.failures[0]
    assert c.pixels == good.cities[t.city].pixels  # the tile still counts as truth
    assert c.tiles == good.cities[t.city].tiles
    for other, oc in report.cities.items():
        if other != t.city:
            assert oc.score == good.cities[other].score
            assert oc.failures == []
    assert report.score == pytest.approx(sum(x.score for x in report.cities.values()) / 3, abs=1e-15)
    assert report.score == pytest.approx((sum(good.cities[o].score for o in good.cities if o != t.city)) / 3, abs=1e-15)
    assert_matches_reference(report, reference_score(broken))


def test_wrong_shape_prediction_fails_the_city() -> None:
    """A prediction of another size cannot be scored: the city gets 0 and the reason names both sizes."""
    st_ = tile_stats("ATL_XXXXXX", "ATL", np.ones((4, 6)), 1.0, 0.0, np.ones((6, 4)), 1.0, 0.0)
    assert st_.failed is not None and "4x6" in st_.failed and "6x4" in st_.failed
    report = score_report([st_])
    assert report.score == 0.0
    assert report.cities["ATL"].failures == [f"ATL_XXXXXX: {st_.failed}"]


def test_city_without_tiles_is_left_out() -> None:
    """The final score averages only the cities present, not a fixed four."""
    tiles = [t for t in random_scene(9, 4, 3, (3, 3), 50.0, 0.0, 0.0, "noisy") if t.city in ("ATL", "OMA")]
    report = package_report(tiles)
    assert sorted(report.cities) == ["ATL", "OMA"]
    assert report.score == pytest.approx((report.cities["ATL"].score + report.cities["OMA"].score) / 2, abs=1e-15)
    assert math.isnan(score_report([]).score)


def test_city_with_no_valid_truth_pixel_is_left_out_of_the_mean() -> None:
    """A city whose truth is all no-data has no truth: reported, but not averaged in (it would score 1)."""
    empty = tile_stats("ATL_A", "ATL", np.full((2, 2), np.nan), 1.0, 0.0, np.zeros((2, 2)), 1.0, 0.0)
    h = np.array([[1.0, 2.0], [3.0, 4.0]])
    real = tile_stats("JAX_A", "JAX", h, 1.0, 0.5, h + 1.0, 1.0, 0.5)
    report = score_report([empty, real])
    assert report.cities["ATL"].pixels == 0 and "ATL" in report.cities
    assert report.score == report.cities["JAX"].score
    assert report.score < 0.9  # JAX's own, imperfect score, not pulled up by an empty ATL


# ----------------------------------------------------------------------------------------------------
# (d) perfect and mean predictions
# ----------------------------------------------------------------------------------------------------


def test_perfect_prediction_scores_one() -> None:
    """Prediction = truth: both error sums are exactly 0, so R² = 1 − 0/(total + 1e-4) = 1 exactly."""
    tiles = random_scene(21, 4, 5, (5, 5), 200.0, 0.2, 0.0, "exact")
    report = package_report(tiles)
    assert report.score == 1.0
    for c in report.cities.values():
        assert (c.agl_r2, c.flow_r2, c.score) == (1.0, 1.0, 1.0)
        assert c.agl_rmse_m == 0.0 and c.epe_rmse_px == 0.0
        assert c.angle_err_mean_deg == 0.0 and c.scale_err_mean == 0.0


def test_perfect_prediction_angle_plus_two_pi() -> None:
    """An angle predicted as θ + 2π is the same direction: score 1 up to rounding, angle error 0."""
    tiles = [
        RefTile(
            t.stem,
            t.city,
            t.agl_true,
            t.scale_true,
            t.angle_true,
            t.agl_pred,
            t.scale_pred,
            t.angle_pred + TWO_PI,
        )
        for t in random_scene(22, 2, 4, (4, 4), 200.0, 0.1, 0.0, "exact")
    ]
    report = package_report(tiles)
    assert report.score == pytest.approx(1.0, abs=1e-12)
    for c in report.cities.values():
        assert c.angle_err_mean_deg == pytest.approx(0.0, abs=1e-9)


def test_damped_mean_prediction_scores_eps_over_total() -> None:
    """Predicting the damped mean m = Σh/(n+1e-4) everywhere makes Σ(ĥ−h)² equal the total, so
    R²_h = 1 − T/(T + 1e-4) = 1e-4/(T + 1e-4): a small positive number, the only visible trace of eps."""
    rng = np.random.default_rng(4)
    truths = [rng.uniform(0, 20, (3, 3)) for _ in range(3)]
    truths[1][0, 0] = NAN
    values = np.concatenate([t[np.isfinite(t)] for t in truths])
    m = math.fsum(values) / (values.size + EPS)
    total = math.fsum((values - m) ** 2)
    tiles = [RefTile(f"JAX_M{i}", "JAX", t, 1.0, 0.5, np.full_like(t, m), 1.0, 0.5) for i, t in enumerate(truths)]
    got = package_report(tiles).cities["JAX"].agl_r2
    assert got == pytest.approx(EPS / (total + EPS), abs=1e-13)
    assert 0.0 < got < 1e-4


# ----------------------------------------------------------------------------------------------------
# (e) diagnostics
# ----------------------------------------------------------------------------------------------------


def test_diagnostics_match_direct_computation() -> None:
    """Angle errors (degrees, wrapped), scale error, pooled AGL RMSE and flow end-point RMSE, per city."""
    rng = np.random.default_rng(8)
    specs = [  # (shape, angle_true, angle_pred, scale_true, scale_pred): angle errors 0.2, 0.5, 0 rad
        ((3, 4), TWO_PI - 0.1, 0.1, 2.0, 2.5),
        ((5, 5), 1.0, 1.5, 1.0, 0.8),
        ((2, 2), 3.0, 3.0, 3.0, 3.0),
    ]
    tiles = []
    for i, (shape, a_t, a_p, s_t, s_p) in enumerate(specs):
        h = rng.uniform(0, 50, shape)
        h[0, 0] = NAN
        p = h + rng.normal(0, 3 * (i + 1), shape)  # errors differ by tile: pooled ≠ mean of per-tile RMSE
        p[-1, -1] = NAN
        tiles.append(RefTile(f"OMA_D{i}", "OMA", h, s_t, a_t, p, s_p, a_p))
    c = package_report(tiles).cities["OMA"]

    errs = np.array([0.2, 0.5, 0.0])
    assert c.angle_err_mean_deg == pytest.approx(math.degrees(errs.mean()), abs=1e-9)
    assert c.angle_err_rms_deg == pytest.approx(math.degrees(math.sqrt(np.mean(errs**2))), abs=1e-9)
    assert c.scale_err_mean == pytest.approx((0.5 + 0.2 + 0.0) / 3, abs=1e-12)

    sq_h: list[float] = []
    sq_v: list[float] = []
    for t in tiles:
        assert t.agl_pred is not None
        ok = np.isfinite(t.agl_true) & np.isfinite(t.agl_pred)
        h, p = t.agl_true[ok], t.agl_pred[ok]
        vx, vy = h * t.scale_true * math.sin(t.angle_true), h * t.scale_true * math.cos(t.angle_true)
        px, py = p * t.scale_pred * math.sin(t.angle_pred), p * t.scale_pred * math.cos(t.angle_pred)
        sq_h += list((p - h) ** 2)
        sq_v += list((px - vx) ** 2 + (py - vy) ** 2)
    assert c.agl_rmse_m == pytest.approx(math.sqrt(np.mean(sq_h)), rel=1e-12)
    assert c.epe_rmse_px == pytest.approx(math.sqrt(np.mean(sq_v)), rel=1e-12)
    assert c.pixels == sum(int(np.isfinite(t.agl_true).sum()) for t in tiles)
    assert c.tiles == 3


def test_tile_stats_fields() -> None:
    """The per-tile reduction: truth moments over valid pixels, both flow components pooled (2n values)."""
    h = np.array([[1.0, NAN], [3.0, 4.0]])
    p = np.array([[2.0, 9.0], [NAN, 4.0]])
    t = tile_stats("ARG_ONE", "ARG", h, 2.0, 0.0, p, 2.0, 0.0)
    assert t.failed is None
    assert (t.agl.n, t.flow.n, t.n_scored) == (3.0, 6.0, 2.0)
    assert t.agl.mean == pytest.approx(8 / 3)
    assert t.flow.mean == pytest.approx((2 + 6 + 8) / 6)  # v = (0, 2h): x all 0, y = 2, 6, 8
    assert t.agl_sse == pytest.approx(1.0)
    assert t.flow_sse == pytest.approx(4.0)
    assert t.angle_err == 0.0 and t.scale_err == 0.0


# ----------------------------------------------------------------------------------------------------
# (f) Moments
# ----------------------------------------------------------------------------------------------------

value_arrays = st.lists(
    st.lists(st.floats(min_value=-200.0, max_value=200.0, allow_nan=False), min_size=0, max_size=12),
    min_size=1,
    max_size=8,
)


def _assert_moments_close(a: Moments, b: Moments, scale: float) -> None:
    assert a.n == b.n
    assert a.mean == pytest.approx(b.mean, rel=1e-12, abs=1e-12 * scale)
    assert a.m2 == pytest.approx(b.m2, rel=1e-9, abs=1e-9 * scale * scale * max(a.n, 1.0))


@settings(max_examples=150, deadline=None)
@given(parts=value_arrays, offset=st.sampled_from([0.0, 1e3, -1e5]), order_seed=st.integers(0, 2**16))
def test_moments_merge_equals_concatenation(parts: list[list[float]], offset: float, order_seed: int) -> None:
    """Merging per-part moments in any order (and tree shape) equals the moments of the concatenation."""
    arrays = [np.asarray(p, dtype=np.float64) + offset for p in parts]
    whole = Moments.of(np.concatenate(arrays))
    scale = 200.0 + abs(offset)
    rng = np.random.default_rng(order_seed)
    order = rng.permutation(len(arrays))
    left = reduce(Moments.merge, [Moments.of(arrays[i]) for i in order], Moments())
    _assert_moments_close(left, whole, scale)
    right = reduce(lambda acc, m: m.merge(acc), [Moments.of(arrays[i]) for i in order], Moments())
    _assert_moments_close(right, whole, scale)
    level = [Moments.of(arrays[i]) for i in order]
    while len(level) > 1:  # balanced pairwise tree
        level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    _assert_moments_close(level[0], whole, scale)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(min_value=-200.0, max_value=200.0, allow_nan=False), min_size=0, max_size=30))
def test_challenge_total_is_damped_sum_of_squares(values: list[float]) -> None:
    """``challenge_total`` = Σ(x − Σx/(n + 1e-4))², the literal challenge total, also after merging halves."""
    x = np.asarray(values, dtype=np.float64)
    damped = math.fsum(values) / (len(values) + 1e-4)
    expected = math.fsum((v - damped) ** 2 for v in values)
    k = len(values) // 2
    for m in (Moments.of(x), Moments.of(x[:k]).merge(Moments.of(x[k:]))):
        assert m.challenge_total() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_moments_empty_is_identity() -> None:
    """Empty parts (tiles with no valid pixel) change nothing; Moments.of(empty) is the zero moment."""
    m = Moments.of(np.array([1.0, 2.0, 4.0]))
    empty = Moments.of(np.array([]))
    assert empty == Moments()
    assert m.merge(empty) == m
    assert empty.merge(m) == m
    assert empty.challenge_total() == 0.0

"""Fitting the ensemble on out-of-fold (OOF) predictions, never on test: member weights, city factors, scale model.

A member is one architecture with K fold models. Its OOF prediction of a training tile is the prediction of the
fold model that did not train on that tile, so every member predicts every training tile exactly once.

**Sufficient statistics.** :func:`tile_oof` reduces one tile and all member predictions of it to a few numbers,
so fitting never touches a pixel again. With ``e_m = ĥ_m − h`` the AGL error of member m over the tile's valid
pixels, ``G = Σ e eᵀ`` (M×M), ``x = Σ h e`` (M), weights ``w`` summing to 1 (so the ensemble's error is ``wᵀe``),
city factor ``f``, ensemble scale ``ŝ`` and angle ``θ̂`` (``û = (sin θ̂, cos θ̂)``, truth ``s``, ``u``)::

    Σ(f·ĥ − h)²  = (f − 1)² Σh² + 2f(f − 1) wᵀx + f² wᵀGw
    Σ‖v̂ − v‖²   = ‖α‖² Σh² + 2(α·β) wᵀx + ‖β‖² wᵀGw,   β = f·ŝ·û,  α = β − s·u

These error sums, pooled per city together with the truth moments that :mod:`geopose_ray.metrics` computes,
go through :func:`geopose_ray.metrics.score_report`: the objective of every fitting step *is* the challenge score
of the combined predictions, exact up to float rounding (the errors are expanded around the truth, so nothing
cancels). Two submission details are outside it: negative heights clipped to 0, and rounding to centimetres.

**Steps** (:func:`fit_ensemble`), each kept only if it raises the OOF score by more than ``min_gain``:

1. weights: greedy ensemble selection with replacement (Caruana et al. 2004) and a constrained least squares
   (non-negative, summing to 1, minimising the AGL half of the score); the better one out of fold wins;
2. per-city AGL factors, each a bounded 1-D maximisation of the score;
3. an XGBoost model of scale from (gsd, city), trained K-fold over the tiles' own folds so that its blend weight
   with the ensemble's scale is fitted on predictions it did not train on.

The fold mean of a member (its K fold models averaged, as at test time) cannot be scored out of fold: every
training tile has exactly one model that did not see it. So the progression starts at the best single member's
OOF score, which is the score of its fold models each on its own held-out fold.

Units are those of the members' predictions: AGL metres and scale pixels per metre at the resolution the models
predict at (the cache's), angles radians, gsd metres per pixel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize, minimize_scalar

from geopose_ray.data.layout import CITIES
from geopose_ray.ensemble.combine import (
    Prediction,
    apply_city_factors,
    blend_scale,
    check_city_factors,
    combine,
    normalise_weights,
    weighted_circular_mean,
)
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.geometry import angle_error
from geopose_ray.metrics import EPS, ROWS_PER_BLOCK, Moments, ScoreReport, TileStats, score_report, tile_stats

if TYPE_CHECKING:
    import xgboost as xgb

    from geopose_ray.data.cache import Sample

FIT_FORMAT = 1
LSQ_ZERO = 1e-6  # least-squares weights below this are set to 0, so such members can be left out of inference


# --------------------------------------------------------------------------------------------------------------
# Sufficient statistics


@dataclass(frozen=True, eq=False)
class TileOof:
    """One training tile and every member's OOF prediction of it, reduced to sufficient statistics.

    Small and picklable: a distributed job computes these where the predictions are made and ships only them.
    """

    truth: TileStats  # metrics' truth moments of heights and flows (stem, city); no prediction terms
    fold: int  # the tile's fold in the manifest
    gsd: float  # metres per pixel
    scale: float  # truth, pixels per metre
    angle: float  # truth, radians
    members: tuple[str, ...]
    err_gram: NDArray[np.float64]  # (M, M) Σ e_m·e_n over valid pixels, m²
    err_cross: NDArray[np.float64]  # (M,) Σ h·e_m over valid pixels, m²
    sumsq: float  # Σ h² over valid pixels, m²
    member_scale: NDArray[np.float64]  # (M,) pixels per metre
    member_angle: NDArray[np.float64]  # (M,) radians


def tile_oof(sample: Sample, fold: int, preds: Mapping[str, Prediction]) -> TileOof:
    """Reduce one training tile and its members' OOF predictions to :class:`TileOof`.

    Args:
        sample: the tile's truth, as :meth:`geopose_ray.data.cache.TrainingCache.load` returns it (the image is
            not read).
        fold: the tile's fold (``ManifestRow.fold``).
        preds: member name → that member's OOF prediction of the tile, at the cache's resolution.

    Raises:
        DataError: a prediction of the wrong size, or non-finite where the truth is valid.
    """
    if not preds:
        raise ConfigError(f"{sample.stem}: no member predictions; pass at least one member's OOF prediction")
    city = CITIES[sample.city]
    h = np.asarray(sample.agl)
    members = tuple(preds)
    for name, p in preds.items():
        if np.shape(p.agl) != h.shape:
            raise DataError(
                f"{sample.stem}: member {name!r} predicted AGL of shape {np.shape(p.agl)}, the truth is {h.shape}; "
                "predict the OOF tiles at the cache's resolution"
            )
        if not (math.isfinite(p.scale) and math.isfinite(p.angle)):
            raise DataError(
                f"{sample.stem}: member {name!r} predicted scale {p.scale}, angle {p.angle}; a non-finite output "
                "means a diverged checkpoint: retrain or drop the member"
            )
    base = tile_stats(sample.stem, city, h, sample.scale, sample.angle, None, math.nan, math.nan)
    m = len(members)
    gram = np.zeros((m, m))
    cross = np.zeros(m)
    sumsq = 0.0
    for r in range(0, h.shape[0], ROWS_PER_BLOCK):
        hb = h[r : r + ROWS_PER_BLOCK]
        valid = np.isfinite(hb)
        hv = hb[valid].astype(np.float64)
        e = np.stack([np.asarray(p.agl[r : r + ROWS_PER_BLOCK])[valid] for p in preds.values()]).astype(np.float64)
        e -= hv
        finite = np.isfinite(e).all(axis=1)
        if not finite.all():
            bad = members[int(np.argmin(finite))]
            raise DataError(
                f"{sample.stem}: member {bad!r} predicted non-finite heights at valid pixels; a diverged "
                "checkpoint: retrain or drop the member"
            )
        gram += e @ e.T
        cross += e @ hv
        sumsq += float(hv @ hv)
    return TileOof(
        truth=TileStats(sample.stem, city, agl=base.agl, flow=base.flow),
        fold=int(fold),
        gsd=float(sample.gsd),
        scale=float(sample.scale),
        angle=float(sample.angle),
        members=members,
        err_gram=gram,
        err_cross=cross,
        sumsq=sumsq,
        member_scale=np.array([p.scale for p in preds.values()], dtype=np.float64),
        member_angle=np.array([p.angle for p in preds.values()], dtype=np.float64),
    )


@dataclass(frozen=True, eq=False)
class OofStats:
    """The OOF fitting data of T tiles and M members, as arrays over tiles. Build with :meth:`from_tiles`."""

    members: tuple[str, ...]
    truth: tuple[TileStats, ...]  # (T,) truth moments, in tile order
    folds: NDArray[np.int64]  # (T,)
    gsd: NDArray[np.float64]  # (T,) metres per pixel
    scale: NDArray[np.float64]  # (T,) truth pixels per metre
    angle: NDArray[np.float64]  # (T,) truth radians
    sumsq: NDArray[np.float64]  # (T,) Σh², m²
    err_gram: NDArray[np.float64]  # (T, M, M)
    err_cross: NDArray[np.float64]  # (T, M)
    member_scale: NDArray[np.float64]  # (T, M)
    member_angle: NDArray[np.float64]  # (T, M)

    @staticmethod
    def from_tiles(tiles: Iterable[TileOof]) -> OofStats:
        """Stack per-tile statistics (any order; members may come in any order but must be the same set).

        Raises:
            DataError: no tiles, a stem twice, or tiles whose member sets differ.
        """
        tiles = list(tiles)
        if not tiles:
            raise DataError("no OOF tiles to fit the ensemble on; compute tile_oof for every training tile first")
        members = tiles[0].members
        stems: set[str] = set()
        rows = []
        for t in tiles:
            if t.truth.stem in stems:
                raise DataError(f"{t.truth.stem}: this tile's OOF statistics were given twice; pass each tile once")
            stems.add(t.truth.stem)
            if set(t.members) != set(members) or len(t.members) != len(members):
                raise DataError(
                    f"{t.truth.stem}: OOF predictions of members {sorted(t.members)}, but the first tile has "
                    f"{sorted(members)}; every member must predict every training tile"
                )
            rows.append(np.array([t.members.index(m) for m in members]))
        return OofStats(
            members=members,
            truth=tuple(t.truth for t in tiles),
            folds=np.array([t.fold for t in tiles], dtype=np.int64),
            gsd=np.array([t.gsd for t in tiles], dtype=np.float64),
            scale=np.array([t.scale for t in tiles], dtype=np.float64),
            angle=np.array([t.angle for t in tiles], dtype=np.float64),
            sumsq=np.array([t.sumsq for t in tiles], dtype=np.float64),
            err_gram=np.stack([t.err_gram[np.ix_(o, o)] for t, o in zip(tiles, rows, strict=True)]),
            err_cross=np.stack([t.err_cross[o] for t, o in zip(tiles, rows, strict=True)]),
            member_scale=np.stack([t.member_scale[o] for t, o in zip(tiles, rows, strict=True)]),
            member_angle=np.stack([t.member_angle[o] for t, o in zip(tiles, rows, strict=True)]),
        )

    def select(self, members: Sequence[str]) -> OofStats:
        """The same tiles restricted to (and ordered as) ``members``."""
        unknown = [m for m in members if m not in self.members]
        if unknown or not members:
            raise ConfigError(f"The value of `members` is {list(members)}, but must be some of {list(self.members)}")
        o = np.array([self.members.index(m) for m in members])
        return replace(
            self,
            members=tuple(members),
            err_gram=self.err_gram[:, o][:, :, o],
            err_cross=self.err_cross[:, o],
            member_scale=self.member_scale[:, o],
            member_angle=self.member_angle[:, o],
        )

    @property
    def stems(self) -> tuple[str, ...]:
        return tuple(t.stem for t in self.truth)

    @property
    def cities(self) -> tuple[str, ...]:
        return tuple(t.city for t in self.truth)

    @cached_property
    def n(self) -> NDArray[np.float64]:
        """(T,) valid pixels per tile."""
        return np.array([t.agl.n for t in self.truth], dtype=np.float64)

    @cached_property
    def city_names(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.cities)))

    @cached_property
    def city_index(self) -> NDArray[np.int64]:
        """(T,) index of each tile's city in :attr:`city_names`."""
        return np.array([self.city_names.index(c) for c in self.cities], dtype=np.int64)

    @cached_property
    def pooled_truth(self) -> tuple[TileStats, ...]:
        """One truth-only :class:`TileStats` per city of :attr:`city_names`, merged in tile order as metrics does."""
        agl = {c: Moments() for c in self.city_names}
        flow = {c: Moments() for c in self.city_names}
        for t in self.truth:
            agl[t.city] = agl[t.city].merge(t.agl)
            flow[t.city] = flow[t.city].merge(t.flow)
        return tuple(TileStats(f"{c} (all tiles)", c, agl=agl[c], flow=flow[c]) for c in self.city_names)

    def factors_per_tile(self, city_factors: Mapping[str, float] | None) -> NDArray[np.float64]:
        """(T,) each tile's AGL factor (1.0 for a city without one)."""
        if not city_factors:
            return np.ones(len(self.truth))
        check_city_factors(city_factors)
        per_city = np.array([float(city_factors.get(c, 1.0)) for c in self.city_names])
        return per_city[self.city_index]


# --------------------------------------------------------------------------------------------------------------
# The objective


@dataclass(frozen=True)
class _Errors:
    agl_sse: NDArray[np.float64]  # (T,) m²
    flow_sse: NDArray[np.float64]  # (T,) px²
    scale: NDArray[np.float64]  # (T,) the ensemble's scale
    angle: NDArray[np.float64]  # (T,) the ensemble's angle


def ensemble_scale(stats: OofStats, weights: ArrayLike) -> NDArray[np.float64]:
    """(T,) the weighted mean of the members' OOF scales, pixels per metre."""
    return stats.member_scale @ normalise_weights(weights, len(stats.members))


def _errors(
    stats: OofStats,
    weights: ArrayLike,
    city_factors: Mapping[str, float] | None,
    scale: ArrayLike | None,
) -> _Errors:
    w = normalise_weights(weights, len(stats.members))
    f = stats.factors_per_tile(city_factors)
    if scale is None:
        s_hat = stats.member_scale @ w
    else:
        s_hat = np.asarray(scale, dtype=np.float64)
        if s_hat.shape != stats.scale.shape or not np.isfinite(s_hat).all():
            raise ConfigError(
                f"The value of `scale` has shape {s_hat.shape}, but must be {stats.scale.shape}, finite, one per tile"
            )
    theta = weighted_circular_mean(stats.member_angle.T, w)
    wgw = (stats.err_gram @ w) @ w
    wx = stats.err_cross @ w
    c = stats.sumsq
    agl_sse = (f - 1.0) ** 2 * c + 2.0 * f * (f - 1.0) * wx + f * f * wgw
    bx, by = f * s_hat * np.sin(theta), f * s_hat * np.cos(theta)
    ax, ay = bx - stats.scale * np.sin(stats.angle), by - stats.scale * np.cos(stats.angle)
    flow_sse = (ax * ax + ay * ay) * c + 2.0 * (ax * bx + ay * by) * wx + (bx * bx + by * by) * wgw
    return _Errors(np.maximum(agl_sse, 0.0), np.maximum(flow_sse, 0.0), s_hat, theta)


def oof_score(
    stats: OofStats,
    weights: ArrayLike,
    city_factors: Mapping[str, float] | None = None,
    scale: ArrayLike | None = None,
) -> float:
    """The challenge score of the combined OOF predictions (the objective of every fitting step).

    Args:
        weights: (M,) member weights, normalised here.
        city_factors: city → AGL factor; cities without one keep 1.0.
        scale: (T,) the ensemble's scale per tile in pixels per metre, e.g. a blend with a scale model;
            ``None`` for the weighted mean of the members' scales.
    """
    e = _errors(stats, weights, city_factors, scale)
    k = len(stats.city_names)
    agl = np.bincount(stats.city_index, e.agl_sse, minlength=k)
    flow = np.bincount(stats.city_index, e.flow_sse, minlength=k)
    n = np.bincount(stats.city_index, stats.n, minlength=k)
    pooled = [
        replace(t, agl_sse=float(agl[i]), flow_sse=float(flow[i]), n_scored=float(n[i]))
        for i, t in enumerate(stats.pooled_truth)
    ]
    return score_report(pooled).score


def oof_report(
    stats: OofStats,
    weights: ArrayLike,
    city_factors: Mapping[str, float] | None = None,
    scale: ArrayLike | None = None,
) -> ScoreReport:
    """Like :func:`oof_score`, but the full per-city report with per-tile diagnostics (angle, scale errors)."""
    e = _errors(stats, weights, city_factors, scale)
    ang = angle_error(e.angle, stats.angle)
    tiles = [
        replace(
            t,
            agl_sse=float(e.agl_sse[i]),
            flow_sse=float(e.flow_sse[i]),
            n_scored=t.agl.n,
            angle_err=float(ang[i]),
            scale_err=abs(float(e.scale[i]) - float(stats.scale[i])),
        )
        for i, t in enumerate(stats.truth)
    ]
    return score_report(tiles)


# --------------------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class WeightFit:
    """Member weights found by one method, and how its OOF score got there."""

    method: str  # "greedy" or "least_squares"
    weights: NDArray[np.float64]  # (M,) non-negative, summing to 1
    score: float  # OOF challenge score of these weights alone
    steps: tuple[tuple[str, float], ...]  # (step, OOF score after it)


def _check_min_gain(min_gain: float) -> None:
    if not (math.isfinite(min_gain) and min_gain >= 0):
        raise ConfigError(f"The value of `min_gain` is {min_gain}, but must be `min_gain >= 0`")


def greedy_selection(stats: OofStats, max_rounds: int = 50, min_gain: float = 0.0) -> WeightFit:
    """Greedy ensemble selection with replacement, on the OOF challenge score.

    Start from the best single member; each round add the member (repeats allowed) whose addition scores best;
    stop when that gains no more than ``min_gain`` or after ``max_rounds`` picks. A member's weight is the share
    of the picks it got. Ties go to the member listed first.
    """
    if max_rounds < 1:
        raise ConfigError(f"The value of `max_rounds` is {max_rounds}, but must be `max_rounds >= 1`")
    _check_min_gain(min_gain)
    m = len(stats.members)
    eye = np.eye(m)
    singles = [oof_score(stats, eye[i]) for i in range(m)]
    best = int(np.argmax(singles))
    counts = eye[best].copy()
    score = singles[best]
    steps = [(f"best single model {stats.members[best]}", score)]
    for _ in range(max_rounds - 1):
        tries = [oof_score(stats, counts + eye[i]) for i in range(m)]
        j = int(np.argmax(tries))
        if not tries[j] - score > min_gain:
            break
        counts[j] += 1
        score = tries[j]
        steps.append((f"+ {stats.members[j]}", score))
    return WeightFit("greedy", counts / counts.sum(), score, tuple(steps))


def least_squares_weights(stats: OofStats) -> WeightFit:
    """Non-negative weights summing to 1 that minimise the AGL half of the OOF score.

    The objective is ``Σ_c Σ_{t∈c} wᵀG_t w / (total_c + 1e-4)``, each city's pooled squared error over its
    challenge total: minimising it maximises the mean AGL R² over the cities exactly. It is a convex quadratic on
    the simplex, solved by SLSQP; weights under 1e-6 are then set to 0. The flow half is not in this
    objective; :func:`fit_ensemble` compares the methods on the full score.
    """
    m = len(stats.members)
    if m == 1:
        w = np.ones(1)
    else:
        totals = np.array([t.agl.challenge_total() + EPS if t.agl.n > 0 else np.inf for t in stats.pooled_truth])
        a = np.einsum("t,tmn->mn", 1.0 / totals[stats.city_index], stats.err_gram)
        a = (a + a.T) / 2.0
        a /= max(float(np.trace(a)) / m, np.finfo(float).tiny)  # the optimum is scale-free; SLSQP likes O(1)
        ones = np.ones(m)
        res = minimize(
            lambda v: float(v @ a @ v),
            ones / m,
            jac=lambda v: 2.0 * (a @ v),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda v: float(v.sum()) - 1.0, "jac": lambda v: ones}],
            options={"ftol": 1e-14, "maxiter": 1000},
        )
        w = np.clip(res.x, 0.0, None)
        w[w < LSQ_ZERO] = 0.0
        if w.sum() <= 0:  # cannot happen for a converged solve; fall back to equal weights rather than fail
            w = ones
        w = w / w.sum()
    score = oof_score(stats, w)
    return WeightFit("least_squares", w, score, (("constrained least squares weights", score),))


# --------------------------------------------------------------------------------------------------------------
# City factors


def fit_city_factors(
    stats: OofStats,
    weights: ArrayLike,
    scale: ArrayLike | None = None,
    bounds: tuple[float, float] = (0.8, 1.5),
    xatol: float = 1e-4,
) -> dict[str, float]:
    """Per-city AGL factors maximising the OOF score, each by a bounded 1-D search (Brent) within ``bounds``.

    A city's score depends only on its own factor, so the cities are fitted one at a time. A city whose best
    factor does not beat 1.0 keeps 1.0.

    Returns:
        city → factor for every city with truth in ``stats``.
    """
    lo, hi = bounds
    if not (0 < lo <= 1.0 <= hi and math.isfinite(hi)):
        raise ConfigError(f"The value of `factor_bounds` is {bounds}, but must be `0 < low <= 1 <= high`")
    base = oof_score(stats, weights, None, scale)
    factors: dict[str, float] = {}
    for t in stats.pooled_truth:
        if t.agl.n == 0:
            continue
        city = t.city
        res = minimize_scalar(
            lambda f, c=city: -oof_score(stats, weights, {c: float(f)}, scale),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": xatol},
        )
        factors[city] = float(res.x) if -float(res.fun) > base else 1.0
    return factors


# --------------------------------------------------------------------------------------------------------------
# Scale model

XGB_PARAMS: dict[str, Any] = {
    "objective": "reg:squarederror",
    "tree_method": "hist",
    "max_depth": 3,
    "eta": 0.05,
    "min_child_weight": 1.0,
    "nthread": 1,  # one core: it runs inside a Ray task, and the data are a few thousand rows
}
XGB_ROUNDS = 300


def _xgb() -> Any:
    # Imported on first use: combining predictions must not pay for (or need) xgboost.
    import xgboost

    return xgboost


def scale_features(gsd: ArrayLike, cities: Sequence[str]) -> NDArray[np.float32]:
    """(N, 1 + 4) features: gsd (metres per pixel), then the city one-hot over ``CITIES``."""
    g = np.atleast_1d(np.asarray(gsd, dtype=np.float64))
    if g.shape != (len(cities),):
        raise ConfigError(f"The value of `gsd` has shape {g.shape}, but must have one entry per city ({len(cities)})")
    if not np.isfinite(g).all():
        raise DataError("a tile's gsd is not finite; the scale model needs every tile's gsd from metadata.csv")
    x = np.zeros((len(cities), 1 + len(CITIES)), dtype=np.float32)
    x[:, 0] = g
    for i, c in enumerate(cities):
        if c not in CITIES:
            raise ConfigError(f"The value of `city` is {c!r}, but must be one of {list(CITIES)}")
        x[i, 1 + CITIES.index(c)] = 1.0
    return x


class ScaleModel:
    """An XGBoost regression of the scale (pixels per metre at the members' resolution) from (gsd, city)."""

    def __init__(self, booster: xgb.Booster) -> None:
        self.booster = booster

    @classmethod
    def train(
        cls,
        gsd: ArrayLike,
        cities: Sequence[str],
        scale: ArrayLike,
        seed: int = 0,
        rounds: int = XGB_ROUNDS,
        params: Mapping[str, Any] | None = None,
    ) -> ScaleModel:
        """Fit on tiles' gsd, city and truth scale; ``params`` override :data:`XGB_PARAMS`."""
        xgboost = _xgb()
        y = np.asarray(scale, dtype=np.float64)
        data = xgboost.DMatrix(scale_features(gsd, cities), label=y)
        booster = xgboost.train({**XGB_PARAMS, "seed": seed, **(params or {})}, data, num_boost_round=rounds)
        return cls(booster)

    def predict(self, gsd: ArrayLike, cities: Sequence[str]) -> NDArray[np.float64]:
        """(N,) predicted scale, pixels per metre."""
        out = self.booster.inplace_predict(scale_features(gsd, cities))
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def to_json(self) -> str:
        """The booster in XGBoost's own JSON format."""
        return bytes(self.booster.save_raw(raw_format="json")).decode("utf-8")

    @classmethod
    def from_json(cls, text: str) -> ScaleModel:
        booster = _xgb().Booster()
        booster.load_model(bytearray(text.encode("utf-8")))
        return cls(booster)


@dataclass(frozen=True, eq=False)
class ScaleFit:
    """A scale model fitted out of fold and its best blend with the ensemble's scale."""

    model: ScaleModel  # trained on every tile, for test-time use
    blend: float  # β in scale = (1 − β)·ensemble + β·model, best out of fold; 0 when the model does not help
    oof_scale: NDArray[np.float64]  # (T,) the blended scale out of fold (the model's K-fold predictions)
    score: float  # OOF score with that blend


def fit_scale_model(
    stats: OofStats,
    weights: ArrayLike,
    city_factors: Mapping[str, float] | None = None,
    seed: int = 0,
    rounds: int = XGB_ROUNDS,
    params: Mapping[str, Any] | None = None,
    grid: int = 101,
) -> ScaleFit:
    """XGBoost scale from (gsd, city), trained K-fold over the tiles' folds, blended by an OOF-fitted weight.

    Each fold's tiles are predicted by a model trained on the other folds; the blend weight β is the best of
    ``grid`` evenly spaced values in [0, 1] (β = 0, the ensemble alone, wins ties). The returned model is then
    trained on every tile.
    """
    folds = np.unique(stats.folds)
    if folds.size < 2:
        raise ConfigError(
            f"the OOF tiles are all in fold {folds.tolist()}, but the scale model is fitted K-fold and needs "
            "tiles from at least 2 folds"
        )
    if grid < 2:
        raise ConfigError(f"The value of `grid` is {grid}, but must be `grid >= 2`")
    cities = np.array(stats.cities)
    oof = np.empty(len(stats.truth))
    for k in folds:
        train = stats.folds != k
        model = ScaleModel.train(stats.gsd[train], list(cities[train]), stats.scale[train], seed, rounds, params)
        oof[~train] = model.predict(stats.gsd[~train], list(cities[~train]))
    ens = ensemble_scale(stats, weights)
    betas = np.linspace(0.0, 1.0, grid)
    scores = [oof_score(stats, weights, city_factors, blend_scale(ens, oof, float(b))) for b in betas]
    j = int(np.argmax(scores))
    final = ScaleModel.train(stats.gsd, list(cities), stats.scale, seed, rounds, params)
    return ScaleFit(final, float(betas[j]), blend_scale(ens, oof, float(betas[j])), float(scores[j]))


# --------------------------------------------------------------------------------------------------------------
# The whole fit


@dataclass(frozen=True)
class EnsembleFit:
    """Everything needed to apply the ensemble at test time, and how it scored out of fold. JSON-serialisable."""

    weights: dict[str, float]  # member → weight (>= 0, sum 1); every member considered, 0 for those left out
    method: str  # "greedy" or "least_squares": the weighting that scored better out of fold
    city_factors: dict[str, float]  # city → AGL factor; empty when the step did not raise the OOF score
    scale_model: str | None  # XGBoost booster (its JSON) of scale from (gsd, city); None when not kept
    scale_blend: float  # β: scale = (1 − β)·ensemble + β·model; 0.0 without a model
    progression: list[tuple[str, float]]  # each kept step and the OOF score after it
    rejected: list[tuple[str, float]] = field(default_factory=list)  # steps tried but not kept, their OOF score
    candidates: dict[str, float] = field(default_factory=dict)  # weighting method → its OOF score
    oof_report: dict[str, Any] = field(default_factory=dict)  # metrics.ScoreReport.as_dict() of the final fit

    @property
    def score(self) -> float:
        """The final OOF score."""
        return self.progression[-1][1]

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(self.weights)

    @property
    def active_members(self) -> tuple[str, ...]:
        """The members with a positive weight: the only ones test inference needs."""
        return tuple(m for m, w in self.weights.items() if w > 0)

    @cached_property
    def scale_model_obj(self) -> ScaleModel | None:
        """The loaded scale model (loaded once per fit object)."""
        return None if self.scale_model is None else ScaleModel.from_json(self.scale_model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FIT_FORMAT,
            "weights": dict(self.weights),
            "method": self.method,
            "city_factors": dict(self.city_factors),
            "scale_model": self.scale_model,
            "scale_blend": self.scale_blend,
            "progression": [list(p) for p in self.progression],
            "rejected": [list(p) for p in self.rejected],
            "candidates": dict(self.candidates),
            "oof_report": self.oof_report,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> EnsembleFit:
        """Rebuild from :meth:`to_dict`. Raises :class:`DataError` for a malformed or foreign document."""
        if d.get("format") != FIT_FORMAT:
            raise DataError(
                f"ensemble fit of format {d.get('format')!r}, this code reads format {FIT_FORMAT}; refit the ensemble"
            )
        try:
            fit = EnsembleFit(
                weights={str(k): float(v) for k, v in d["weights"].items()},
                method=str(d["method"]),
                city_factors={str(k): float(v) for k, v in d["city_factors"].items()},
                scale_model=None if d["scale_model"] is None else str(d["scale_model"]),
                scale_blend=float(d["scale_blend"]),
                progression=[(str(s), float(v)) for s, v in d["progression"]],
                rejected=[(str(s), float(v)) for s, v in d.get("rejected", [])],
                candidates={str(k): float(v) for k, v in d.get("candidates", {}).items()},
                oof_report=dict(d.get("oof_report", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"ensemble fit is malformed ({e!r}); refit the ensemble") from e
        w = np.array(list(fit.weights.values()))
        if w.size == 0 or not np.isfinite(w).all() or (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-9:
            raise DataError(f"ensemble fit has weights {fit.weights}, not non-negative summing to 1; refit it")
        if not fit.progression:
            raise DataError("ensemble fit has an empty progression; refit the ensemble")
        try:
            check_city_factors(fit.city_factors)
            blend_scale(0.0, 0.0, fit.scale_blend)
        except ConfigError as e:
            raise DataError(f"ensemble fit is malformed: {e}; refit the ensemble") from e
        return fit

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_json(text: str) -> EnsembleFit:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"ensemble fit is not valid JSON ({e}); pass the file fit_ensemble wrote") from e
        if not isinstance(d, dict):
            raise DataError("ensemble fit JSON is not an object; pass the file fit_ensemble wrote")
        return EnsembleFit.from_dict(d)


def fit_ensemble(
    stats: OofStats,
    max_rounds: int = 50,
    min_gain: float = 1e-4,
    city_factors: bool = True,
    factor_bounds: tuple[float, float] = (0.8, 1.5),
    scale_model: bool = True,
    seed: int = 0,
    xgb_rounds: int = XGB_ROUNDS,
    xgb_params: Mapping[str, Any] | None = None,
) -> EnsembleFit:
    """Fit weights, then city factors, then a scale model on OOF statistics; keep each step only if it helps.

    Args:
        max_rounds: most picks of the greedy selection.
        min_gain: a greedy pick, the least-squares weights (over the greedy ones), the city factors and the scale
            model are kept only if they raise the OOF score by more than this (they are fitted on the same OOF
            data, so any fitted step "improves" a little).
        city_factors, scale_model: whether to try those steps.
        factor_bounds: the range searched for each city's AGL factor.
        seed: XGBoost's seed.
    """
    _check_min_gain(min_gain)
    greedy = greedy_selection(stats, max_rounds, min_gain)
    lsq = least_squares_weights(stats)
    progression = list(greedy.steps)
    rejected: list[tuple[str, float]] = []
    chosen = lsq if lsq.score - greedy.score > min_gain else greedy
    if chosen is lsq:
        progression.extend(lsq.steps)
    else:
        rejected.extend(lsq.steps)
    w = chosen.weights
    score = chosen.score

    factors: dict[str, float] = {}
    if city_factors:
        fitted = fit_city_factors(stats, w, bounds=factor_bounds)
        s = oof_score(stats, w, fitted)
        step = ("city factors " + ", ".join(f"{c} {f:.3f}" for c, f in fitted.items()), s)
        if s - score > min_gain:
            factors, score = fitted, s
            progression.append(step)
        else:
            rejected.append(step)

    scale_json: str | None = None
    blend = 0.0
    final_scale: NDArray[np.float64] | None = None
    if scale_model:
        sf = fit_scale_model(stats, w, factors, seed, xgb_rounds, xgb_params)
        step = (f"XGBoost scale (blend {sf.blend:.2f})", sf.score)
        if sf.blend > 0 and sf.score - score > min_gain:
            scale_json, blend, final_scale, score = sf.model.to_json(), sf.blend, sf.oof_scale, sf.score
            progression.append(step)
        else:
            rejected.append(step)

    return EnsembleFit(
        weights={m: float(v) for m, v in zip(stats.members, w, strict=True)},
        method=chosen.method,
        city_factors=factors,
        scale_model=scale_json,
        scale_blend=blend,
        progression=progression,
        rejected=rejected,
        candidates={greedy.method: greedy.score, lsq.method: lsq.score},
        oof_report=oof_report(stats, w, factors, final_scale).as_dict(),
    )


def apply_fit(fit: EnsembleFit, preds: Mapping[str, Prediction], city: str, gsd: float) -> Prediction:
    """The ensemble's prediction of one test tile, in the members' units (convert to submission units after).

    Args:
        preds: member name → its prediction (the fold mean of its K models); only :attr:`EnsembleFit.active_members`
            are read.
        city: one of ``CITIES``.
        gsd: metres per pixel (used only by the scale model).
    """
    active = fit.active_members
    missing = [m for m in active if m not in preds]
    if missing:
        raise ConfigError(f"no prediction of member(s) {missing}; this ensemble needs {list(active)}")
    pred = combine([preds[m] for m in active], [fit.weights[m] for m in active])
    pred = apply_city_factors(pred, city, fit.city_factors)
    model = fit.scale_model_obj
    if model is not None and fit.scale_blend > 0:
        s = blend_scale(pred.scale, model.predict([gsd], [city])[0], fit.scale_blend)
        pred = Prediction(agl=pred.agl, scale=float(s), angle=pred.angle)
    return pred

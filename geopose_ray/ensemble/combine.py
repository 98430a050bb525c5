"""Combination rules of the ensemble, on raw fp32 model outputs, before any conversion to submission units.

* AGL and scale: weighted arithmetic mean (accumulated in float64, AGL returned as float32).
* Angle: weighted circular mean, ``atan2(Σ w·sin θ, Σ w·cos θ)`` wrapped to [0, 2π); with equal weights it is
  :func:`scipy.stats.circmean`. A plain mean of angles is wrong across the wrap: 350° and 10° average to 0°.
* City factor: the combined AGL of a tile is multiplied by its city's factor; scale is left alone, so the flow
  (AGL · scale) scales with it, as in the seed's post-processing.
* Scale blend: ``(1 − β) · ensemble scale + β · scale model``.

Weights are non-negative and need not sum to 1 (they are normalised); a member of weight 0 is never read, so
it may be left out of inference altogether. Units: AGL in metres, scale in pixels per metre, both at the
resolution the members predict at; angles in radians.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from geopose_ray.data.layout import CITIES
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.geometry import direction_to_angle


@dataclass(frozen=True)
class Prediction:
    """One model's (or the ensemble's) prediction for one tile."""

    agl: NDArray[np.float32]  # (H, W) metres at the model's resolution; NaN stays NaN through combination
    scale: float  # pixels of flow per metre of height, at the model's resolution
    angle: float  # radians


def normalise_weights(weights: ArrayLike, n: int | None = None) -> NDArray[np.float64]:
    """Weights as a float64 vector that sums to 1.

    Args:
        weights: one non-negative finite weight per member, not all zero.
        n: the number of members they must match, if known.

    Raises:
        ConfigError: wrong length, negative, non-finite or all-zero weights.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ConfigError(f"The value of `weights` has shape {w.shape}, but must be a non-empty 1-D sequence")
    if n is not None and w.size != n:
        raise ConfigError(f"The value of `weights` has {w.size} entries, but there are {n} members; give one each")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ConfigError(f"The value of `weights` is {w.tolist()}, but every weight must be finite and >= 0")
    total = float(w.sum())
    if total <= 0:
        raise ConfigError(f"The value of `weights` is {w.tolist()}, but at least one weight must be > 0")
    return w / total


def weighted_mean(values: Sequence[ArrayLike], weights: ArrayLike | None = None) -> NDArray[np.float64]:
    """``Σ w_m · values_m`` with normalised weights; members of weight 0 are skipped (their NaNs do not spread).

    Args:
        values: one array per member, all of one shape (e.g. AGL maps (H, W), metres).
        weights: one per member; ``None`` for equal weights.

    Returns:
        The weighted mean, float64, of the members' shape.
    """
    if not values:
        raise ConfigError("The value of `values` is empty, but the ensemble needs at least one member")
    w = normalise_weights(np.ones(len(values)) if weights is None else weights, len(values))
    shapes = {np.shape(v) for v in values}
    if len(shapes) > 1:
        raise DataError(f"members predicted arrays of different shapes {sorted(shapes)}; predict at one resolution")
    out = np.zeros(np.shape(values[0]), dtype=np.float64)
    for v, wm in zip(values, w, strict=True):
        if wm > 0:
            out += wm * np.asarray(v, dtype=np.float64)
    return out


def weighted_circular_mean(angles: ArrayLike, weights: ArrayLike | None = None) -> NDArray[np.float64]:
    """Weighted circular mean ``atan2(Σ w·sin θ, Σ w·cos θ)`` in [0, 2π).

    Args:
        angles: radians, members on the first axis: (M,) or (M, ...) for several tiles at once.
        weights: (M,); ``None`` for equal weights, which gives :func:`scipy.stats.circmean`. Members of
            weight 0 are skipped.

    Returns:
        Radians in [0, 2π), shape ``angles.shape[1:]``. When the weighted directions cancel exactly the mean is
        undefined and 0 is returned.
    """
    a = np.asarray(angles, dtype=np.float64)
    if a.ndim == 0 or a.shape[0] == 0:
        raise ConfigError(f"The value of `angles` has shape {a.shape}, but must hold at least one member angle")
    w = normalise_weights(np.ones(a.shape[0]) if weights is None else weights, a.shape[0])
    if not (w > 0).all():  # a member of weight 0 is never read: its NaN must not spread through 0·NaN
        a, w = a[w > 0], w[w > 0]
    # Geometry's convention: θ = atan2(x, y) with (x, y) = (sin θ, cos θ).
    return direction_to_angle(np.tensordot(w, np.sin(a), axes=1), np.tensordot(w, np.cos(a), axes=1))


def combine(preds: Sequence[Prediction], weights: ArrayLike | None = None) -> Prediction:
    """The ensemble of member predictions of one tile: weighted mean AGL and scale, circular mean angle.

    Raises:
        DataError: the members' AGL maps differ in size.
    """
    if not preds:
        raise ConfigError("The value of `preds` is empty, but the ensemble needs at least one member prediction")
    w = normalise_weights(np.ones(len(preds)) if weights is None else weights, len(preds))
    agl = weighted_mean([p.agl for p in preds], w).astype(np.float32)
    scale = float(weighted_mean([np.float64(p.scale) for p in preds], w))
    angle = float(weighted_circular_mean([p.angle for p in preds], w))
    return Prediction(agl=agl, scale=scale, angle=angle)


def check_city_factors(factors: Mapping[str, float]) -> None:
    """Raise :class:`ConfigError` unless every key is a city of the challenge and every factor finite and > 0."""
    for city, f in factors.items():
        if city not in CITIES:
            raise ConfigError(f"The city factor key is {city!r}, but must be one of {list(CITIES)}")
        if not (math.isfinite(f) and f > 0):
            raise ConfigError(f"The city factor of {city} is {f}, but must be finite and > 0")


def apply_city_factors(pred: Prediction, city: str, factors: Mapping[str, float]) -> Prediction:
    """Multiply the AGL of a tile of ``city`` by its factor (1.0 for a city without one); scale is unchanged."""
    check_city_factors(factors)
    if city not in CITIES:
        raise ConfigError(f"The value of `city` is {city!r}, but must be one of {list(CITIES)}")
    f = float(factors.get(city, 1.0))
    if f == 1.0:
        return pred
    return Prediction(agl=(pred.agl.astype(np.float64) * f).astype(np.float32), scale=pred.scale, angle=pred.angle)


def blend_scale(ensemble_scale: ArrayLike, model_scale: ArrayLike, weight: float) -> NDArray[np.float64]:
    """``(1 − weight) · ensemble_scale + weight · model_scale``, pixels per metre; ``weight`` in [0, 1]."""
    if not (0.0 <= weight <= 1.0):
        raise ConfigError(f"The value of `scale_blend` is {weight}, but must be `0 <= scale_blend <= 1`")
    e = np.asarray(ensemble_scale, dtype=np.float64)
    if weight == 0.0:
        return e
    return (1.0 - weight) * e + weight * np.asarray(model_scale, dtype=np.float64)

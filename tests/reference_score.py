"""A deliberately naive reference implementation of the challenge score, written from docs/formats-and-score.md only.

It shares no code with :mod:`geopose_ray.metrics`: every pixel is visited in a plain Python loop, flows are
built with :mod:`math`, all valid pixels of a city are concatenated into lists, and sums use
:func:`math.fsum`. The formula (docs/formats-and-score.md, "The score"):

* valid = truth AGL finite; pooled over all valid pixels of all tiles of a city;
* ``R²_h = 1 − Σ(ĥ−h)² / (Σ(h − mean_h)² + 1e-4)``, ``mean_h = Σh / (n + 1e-4)``;
* ``v = h·s·(sin θ, cos θ)``; ``R²_v = 1 − Σ‖v̂−v‖² / (Σ_k Σ(v_k − mean_v)² + 1e-4)``,
  ``mean_v = Σ(v_x + v_y) / (2n + 1e-4)`` (one scalar for both components);
* NaN prediction pixels drop out of the error sums only (never out of the totals);
* ``score_c = (R²_h + R²_v) / 2``; final = mean over the cities present;
* a missing prediction (``agl_pred is None``), a non-finite predicted scale or angle, or a prediction of the
  wrong shape scores the whole city 0 (its two R² are reported as 0 too, as the package does).

Scale is in pixels per metre, heights in metres, angles in radians.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

EPS = 1e-4


@dataclass(frozen=True)
class RefTile:
    """One tile's truth and prediction, as given to the reference."""

    stem: str
    city: str
    agl_true: NDArray[np.floating]
    scale_true: float
    angle_true: float
    agl_pred: NDArray[np.floating] | None
    scale_pred: float
    angle_pred: float

    def usable(self) -> bool:
        """Whether the prediction can be scored at all."""
        return (
            self.agl_pred is not None
            and math.isfinite(self.scale_pred)
            and math.isfinite(self.angle_pred)
            and np.shape(self.agl_pred) == np.shape(self.agl_true)
        )


@dataclass(frozen=True)
class RefCity:
    """The reference result of one city."""

    agl_r2: float
    flow_r2: float
    score: float
    failed: bool
    pixels: int


@dataclass(frozen=True)
class RefReport:
    """The reference result: final score and per-city results."""

    score: float
    cities: dict[str, RefCity]


def _flow(h: float, scale: float, angle: float) -> tuple[float, float]:
    """``(x, y) = h·s·(sin θ, cos θ)``: column offset first, row offset second."""
    mag = h * scale
    return mag * math.sin(angle), mag * math.cos(angle)


def reference_city(tiles: list[RefTile]) -> RefCity:
    """The score of one city by the literal formula."""
    h_all: list[float] = []
    vx_all: list[float] = []
    vy_all: list[float] = []
    err_h: list[float] = []
    err_v: list[float] = []
    failed = False
    for t in tiles:
        ok = t.usable()
        failed = failed or not ok
        truth = np.asarray(t.agl_true, dtype=np.float64)
        pred = np.asarray(t.agl_pred, dtype=np.float64) if ok else None
        rows, cols = truth.shape
        for i in range(rows):
            for j in range(cols):
                h = float(truth[i, j])
                if not math.isfinite(h):
                    continue
                vx, vy = _flow(h, t.scale_true, t.angle_true)
                h_all.append(h)
                vx_all.append(vx)
                vy_all.append(vy)
                if pred is None:
                    continue
                p = float(pred[i, j])
                if not math.isfinite(p):
                    continue
                px, py = _flow(p, t.scale_pred, t.angle_pred)
                err_h.append((p - h) ** 2)
                err_v.append((px - vx) ** 2 + (py - vy) ** 2)
    n = len(h_all)
    if failed:
        return RefCity(0.0, 0.0, 0.0, True, n)
    mean_h = math.fsum(h_all) / (n + EPS)
    total_h = math.fsum((h - mean_h) ** 2 for h in h_all)
    mean_v = math.fsum(vx + vy for vx, vy in zip(vx_all, vy_all, strict=True)) / (2 * n + EPS)
    total_v = math.fsum((vx - mean_v) ** 2 for vx in vx_all) + math.fsum((vy - mean_v) ** 2 for vy in vy_all)
    r2_h = 1.0 - math.fsum(err_h) / (total_h + EPS)
    r2_v = 1.0 - math.fsum(err_v) / (total_v + EPS)
    return RefCity(r2_h, r2_v, (r2_h + r2_v) / 2.0, False, n)


def reference_score(tiles: Iterable[RefTile]) -> RefReport:
    """Per-city scores and the final score: the mean over the cities with truth (at least one valid pixel)."""
    by_city: dict[str, list[RefTile]] = {}
    for t in tiles:
        by_city.setdefault(t.city, []).append(t)
    cities = {c: reference_city(ts) for c, ts in sorted(by_city.items())}
    present = [c.score for c in cities.values() if c.pixels > 0]
    final = math.fsum(present) / len(present) if present else math.nan
    return RefReport(final, cities)

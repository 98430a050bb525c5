"""The trivial predictor: each city's training means. The floor every trained model must clear."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from geopose_ray.data.cache import TrainingCache
from geopose_ray.data.layout import CITIES
from geopose_ray.data.manifest import ManifestRow
from geopose_ray.geometry import direction_to_angle
from geopose_ray.metrics import ScoreReport, score_report, tile_stats


def city_means(
    cache: TrainingCache, rows: Iterable[ManifestRow] | None = None
) -> dict[str, tuple[float, float, float]]:
    """Per city, over ``rows`` (default: the whole cache): mean valid AGL (m), mean scale (px/m at the cache's
    resolution) and circular-mean angle (radians). A city without rows gets the means over all cities."""
    sums: dict[str, list[float]] = {c: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] for c in CITIES}
    for row in cache.rows if rows is None else rows:
        s = cache.load(row.stem)
        valid = np.isfinite(s.agl)
        acc = sums[row.city]
        acc[0] += float(s.agl[valid].sum())
        acc[1] += float(valid.sum())
        acc[2] += s.scale
        acc[3] += float(np.sin(s.angle))
        acc[4] += float(np.cos(s.angle))
        acc[5] += 1
    everything = np.sum(list(sums.values()), axis=0)
    means = {}
    for city, acc in sums.items():
        a = acc if acc[5] else list(everything)
        means[city] = (a[0] / max(a[1], 1.0), a[2] / a[5], float(direction_to_angle(a[3], a[4])))
    return means


def means_floor(cache: TrainingCache, val_fold: int) -> ScoreReport:
    """The score on ``val_fold`` of predicting the means of the other folds (same scoring as validation)."""
    means = city_means(cache, [r for r in cache.rows if r.fold != val_fold])
    stats = []
    for r in (r for r in cache.rows if r.fold == val_fold):
        s = cache.load(r.stem)
        h, scale, angle = means[r.city]
        stats.append(tile_stats(r.stem, r.city, s.agl, s.scale, s.angle, np.full_like(s.agl, h), scale, angle))
    return score_report(stats)

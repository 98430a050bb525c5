"""The ensemble's pure core: combination rules and fitting on out-of-fold predictions (no Ray, MLflow or IO).

:mod:`~geopose_ray.ensemble.combine` holds the rules that turn member predictions of one tile into the
ensemble's; :mod:`~geopose_ray.ensemble.fit` fits their parameters on out-of-fold predictions and applies them.
"""

from __future__ import annotations

from geopose_ray.ensemble.combine import (
    Prediction,
    apply_city_factors,
    blend_scale,
    combine,
    normalise_weights,
    weighted_circular_mean,
    weighted_mean,
)
from geopose_ray.ensemble.fit import (
    EnsembleFit,
    OofStats,
    ScaleFit,
    ScaleModel,
    TileOof,
    WeightFit,
    apply_fit,
    ensemble_scale,
    fit_city_factors,
    fit_ensemble,
    fit_scale_model,
    greedy_selection,
    least_squares_weights,
    oof_report,
    oof_score,
    tile_oof,
)

__all__ = [
    "EnsembleFit",
    "OofStats",
    "Prediction",
    "ScaleFit",
    "ScaleModel",
    "TileOof",
    "WeightFit",
    "apply_city_factors",
    "apply_fit",
    "blend_scale",
    "combine",
    "ensemble_scale",
    "fit_city_factors",
    "fit_ensemble",
    "fit_scale_model",
    "greedy_selection",
    "least_squares_weights",
    "normalise_weights",
    "oof_report",
    "oof_score",
    "tile_oof",
    "weighted_circular_mean",
    "weighted_mean",
]

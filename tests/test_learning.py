"""Learning, shown: the baseline model learns height, direction and scale from the synthetic city.

Thresholds come from measured runs (BENCHMARKS.md, "Learning"): over the last five of 20 epochs the
validation score averaged 0.51 (0.49 with channels-last off) against a floor (training means) of 0.002,
AGL R² 0.63 and the direction's squared error 0.21 (about 0.5 means no direction learned). Each bound below
keeps a wide margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geopose_ray.baselines import means_floor
from geopose_ray.data.cache import TrainingCache, prepare_cache
from geopose_ray.data.synth import synthesize
from geopose_ray.engine import TrainConfig, Trainer


@pytest.mark.slow
def test_baseline_learns_well_above_the_training_means(tmp_path: Path) -> None:
    synthesize(tmp_path / "data", 480, 128, seed=0, workers=2)
    prepare_cache(tmp_path / "data" / "train", tmp_path / "cache", 2, folds=4, seed=0, workers=2)
    floor = means_floor(TrainingCache(tmp_path / "cache"), val_fold=0).score
    cfg = TrainConfig.from_dict(
        {"cache": str(tmp_path / "cache"), "model": {"encoder": "resnet18"}, "epochs": 20, "batch_size": 8, "lr": 1e-3}
    )
    history = Trainer(cfg, tmp_path / "run").fit()
    last = history[-5:]
    score = float(np.mean([h["score"] for h in last]))
    assert abs(floor) < 0.1
    assert score > floor + 0.25, [round(h["score"], 3) for h in history]
    assert np.mean([h["agl_r2"] for h in last]) > 0.45
    assert np.mean([h["val/xy"] for h in last]) < 0.35  # the direction is learned, not guessed
    assert history[-1]["train/total"] < 0.7 * history[0]["train/total"]

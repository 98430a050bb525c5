"""Learning, shown: the baseline model learns height, direction and scale from the synthetic city.

Two sizes of one test (docs/testing.md). The suite's run is the smallest that still shows every part learning:
480 tiles at 32 px, timm's test ResNet, 10 epochs (about 40 s on one core); measured over its last three epochs,
score 0.40 against a floor (training means) of -0.005, AGL R² 0.55 and the direction's squared error 0.26 (about
0.5 means no direction learned). The soak run (`make soak`) is the full one of docs/benchmarks/learning.md: U-Net on
ResNet-18 at 64 px for 20 epochs, whose last five epochs averaged 0.51, AGL R² 0.63 and direction 0.21. Each bound
keeps a wide margin below what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from geopose_ray.baselines import means_floor
from geopose_ray.data.cache import TrainingCache, prepare_cache
from geopose_ray.data.synth import synthesize
from geopose_ray.engine import TrainConfig, Trainer


@dataclass(frozen=True)
class Size:
    tiles: int  # synthetic training tiles
    px: int  # tile side before downsampling by 2
    encoder: str
    epochs: int
    lr: float
    last: int  # epochs averaged
    margin: float  # the score must beat the floor by this much
    agl_r2: float  # the AGL R² must be above this
    xy: float  # the direction's squared error must be below this


SMALL = Size(tiles=480, px=64, encoder="tu-test_resnet", epochs=10, lr=3e-3, last=3, margin=0.2, agl_r2=0.4, xy=0.4)
FULL = Size(tiles=480, px=128, encoder="resnet18", epochs=20, lr=1e-3, last=5, margin=0.25, agl_r2=0.45, xy=0.35)


@pytest.mark.slow
@pytest.mark.parametrize("size", [SMALL, pytest.param(FULL, marks=pytest.mark.soak)], ids=["small", "full"])
def test_baseline_learns_well_above_the_training_means(tmp_path: Path, size: Size) -> None:
    synthesize(tmp_path / "data", size.tiles, size.px, seed=0, workers=2)
    prepare_cache(tmp_path / "data" / "train", tmp_path / "cache", 2, folds=4, seed=0, workers=2)
    floor = means_floor(TrainingCache(tmp_path / "cache"), val_fold=0).score
    cfg = TrainConfig.from_dict(
        {
            "cache": str(tmp_path / "cache"),
            "model": {"encoder": size.encoder},
            "epochs": size.epochs,
            "batch_size": 8,
            "lr": size.lr,
        }
    )
    history = Trainer(cfg, tmp_path / "run").fit()
    last = history[-size.last :]
    score = float(np.mean([h["score"] for h in last]))
    assert abs(floor) < 0.1
    assert score > floor + size.margin, [round(h["score"], 3) for h in history]
    assert np.mean([h["agl_r2"] for h in last]) > size.agl_r2
    assert np.mean([h["val/xy"] for h in last]) < size.xy  # the direction is learned, not guessed
    assert history[-1]["train/total"] < 0.7 * history[0]["train/total"]

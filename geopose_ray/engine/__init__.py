"""The training engine in plain torch (no Ray, no MLflow): config, training loop, checkpoints, prediction."""

from __future__ import annotations

from geopose_ray.engine.config import TrainConfig
from geopose_ray.engine.trainer import Trainer, TrainingError

__all__ = ["TrainConfig", "Trainer", "TrainingError"]

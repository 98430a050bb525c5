"""Geopose models: any segmentation-models-pytorch decoder with any smp or timm encoder, plus geopose heads."""

from __future__ import annotations

from geopose_ray.models.config import ModelConfig
from geopose_ray.models.geopose import GeoposeModel, build_model, validate_model_config

__all__ = ["GeoposeModel", "ModelConfig", "build_model", "validate_model_config"]

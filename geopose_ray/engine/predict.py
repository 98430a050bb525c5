"""Prediction: a checkpoint → a submission directory, with optional flip / rot90 test-time augmentation.

Under a transform T of the input (k quarter turns counter-clockwise, then optionally the columns reversed),
the model predicts in T's frame; AGL is mapped back by T⁻¹ and the angle by θ = T⁻¹(θ_T):
a quarter turn adds π/2 to θ and reversing the columns negates it (see ``geopose_ray.data.augment``).
AGL and scale are averaged; angles are averaged on the circle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from geopose_ray.data.cache import downsample_rgb
from geopose_ray.data.layout import (
    CITIES,
    city_of,
    locate_metadata,
    lookup_metadata,
    read_metadata,
    require_gsd,
    scan_dir,
)
from geopose_ray.data.rasters import read_rgb
from geopose_ray.data.submission import check_submission, write_prediction
from geopose_ray.engine.checkpoint import load_checkpoint
from geopose_ray.engine.config import TrainConfig
from geopose_ray.engine.trainer import resolve_device
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.geometry import direction_to_angle
from geopose_ray.models.geopose import GeoposeModel

TTA_MODES = ("none", "flip", "d4")


@dataclass(frozen=True)
class Transform:
    """k quarter turns counter-clockwise, then the columns reversed if ``flip``."""

    k: int = 0
    flip: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform images or maps (..., H, W)."""
        x = torch.rot90(x, self.k, dims=(-2, -1))
        return x.flip(-1) if self.flip else x

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Map (..., H, W) from the transformed frame back."""
        x = x.flip(-1) if self.flip else x
        return torch.rot90(x, -self.k, dims=(-2, -1))

    def invert_angle(self, angle: torch.Tensor) -> torch.Tensor:
        """θ from θ_T = flip(θ + kπ/2), where flip negates."""
        a = -angle if self.flip else angle
        return a - self.k * math.pi / 2


def tta_transforms(mode: str) -> list[Transform]:
    if mode == "none":
        return [Transform()]
    if mode == "flip":
        return [Transform(), Transform(0, True), Transform(2, True)]  # identity, columns, rows reversed
    if mode == "d4":
        return [Transform(k, f) for k in range(4) for f in (False, True)]
    raise ConfigError(f"The value of `tta` is {mode!r}, but must be one of {list(TTA_MODES)}")


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    image: torch.Tensor,
    gsd: torch.Tensor,
    city: torch.Tensor,
    tta: str = "none",
) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
    """Predict (B, 3, H, W) uint8 images: AGL (B, H, W) metres, scale (B,) px/m, angle (B,) radians."""
    transforms = tta_transforms(tta)
    agl = torch.zeros(image.shape[0], image.shape[-2], image.shape[-1], device=image.device)
    scale = torch.zeros(image.shape[0], device=image.device)
    sin = torch.zeros_like(scale)
    cos = torch.zeros_like(scale)
    for t in transforms:
        out = model(t.apply(image), gsd, city)
        agl += t.invert(out["agl"].float()[:, 0])
        scale += out["scale"].float()
        theta = t.invert_angle(torch.atan2(out["xy"][:, 0].float(), out["xy"][:, 1].float()))
        sin += torch.sin(theta)
        cos += torch.cos(theta)
    n = len(transforms)
    angle = direction_to_angle(sin.cpu().numpy(), cos.cpu().numpy())
    return (agl / n).cpu().numpy(), (scale / n).cpu().numpy().astype(np.float64), angle


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[GeoposeModel, TrainConfig, int]:
    """The model of a checkpoint, its training config and the cache's downsample factor."""
    state = load_checkpoint(checkpoint, device)
    cfg = TrainConfig.from_dict(state["config"])
    model = GeoposeModel(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, int(state["downsample"])


def predict_dir(
    checkpoint: str | Path,
    test_dir: str | Path,
    out_dir: str | Path,
    tta: str = "none",
    batch_size: int = 4,
    device: str = "auto",
    metadata: str | Path | None = None,
) -> int:
    """Predict every test tile of ``test_dir`` into a submission at ``out_dir``; returns the tile count.

    ``metadata``: the metadata.csv with the tiles' gsd (``--metadata``); default the one beside the tiles, else
    the data root's above them (:func:`~geopose_ray.data.layout.locate_metadata`). A model that uses gsd is
    refused, before any tile is predicted, when a test tile has no finite gsd > 0.
    """
    test_dir, out_dir = Path(test_dir), Path(out_dir)
    tta_transforms(tta)  # validate before loading anything
    stems = sorted(s for s, f in scan_dir(test_dir).items() if f.rgb)
    if not stems:
        raise DataError(f"{test_dir}: no test tiles (*_RGB.j2k or *_RGB.tif) to predict")
    meta_path = locate_metadata(test_dir, metadata)
    meta = read_metadata(meta_path) if meta_path is not None else {}
    dev = resolve_device(device)
    model, cfg, k = load_model(checkpoint, dev)
    if cfg.model.metadata:
        require_gsd(meta_path, meta, stems, test_dir, "this model (it uses gsd)")
    files = scan_dir(test_dir)
    for start in range(0, len(stems), batch_size):
        chunk = stems[start : start + batch_size]
        images, shapes, gsds, cities = [], [], [], []
        for stem in chunk:
            rgb = read_rgb(files[stem].rgb[0])
            if rgb.shape[0] % k or rgb.shape[1] % k:
                raise DataError(f"{files[stem].rgb[0]}: size {rgb.shape[1]}x{rgb.shape[0]} is not divisible by {k}")
            shapes.append(rgb.shape[:2])
            images.append(torch.from_numpy(downsample_rgb(rgb, k).transpose(2, 0, 1).copy()))
            row = lookup_metadata(meta, stem)
            gsds.append(row.gsd if row is not None else math.nan)
            cities.append(CITIES.index(city_of(stem)))
        if len({tuple(i.shape) for i in images}) > 1:
            raise DataError(f"{test_dir}: test tiles of different sizes in one batch; use --batch-size 1")
        batch = torch.stack(images).to(dev)
        agl, scale, angle = predict_batch(
            model, batch, torch.tensor(gsds, device=dev), torch.tensor(cities, device=dev), tta
        )
        for j, stem in enumerate(chunk):
            write_prediction(out_dir, stem, agl[j], float(scale[j]), float(angle[j]), full_shape=shapes[j])
    problems = check_submission(out_dir, test_dir)
    if problems:
        raise DataError(f"{out_dir}: the written submission is incomplete: {problems[0]}")
    return len(stems)

"""Label-consistent augmentation of one sample (numpy, before tensor conversion).

Geometry (image axes: x = columns to the right, y = rows down; a flow direction is (sin θ, cos θ)):

* rotating the image content counter-clockwise (as displayed) by α maps a vector (x, y) to
  (x cos α + y sin α, −x sin α + y cos α), so θ' = θ + α; ``np.rot90(k)`` is α = k·90°;
* reversing the columns negates x: θ' = −θ; reversing the rows negates y: θ' = π − θ;
* zooming the content by f multiplies flow lengths, hence magnitude and scale, by f; AGL is unchanged.

Pixels that come from outside the source tile are no-data (NaN AGL, black RGB), never height 0.

Randomness comes only from the generator passed in; the dataset makes one per (seed, epoch, sample index),
so every data-loader worker and epoch draws an independent stream and a run is reproducible for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from geopose_ray.errors import ConfigError
from geopose_ray.geometry import wrap_angle


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to draw for each training sample."""

    rot90: bool = True  # a random multiple of 90°
    flip: bool = True  # random column and row reversals
    rotate_deg: float = 0.0  # an arbitrary rotation, uniform in ±rotate_deg degrees (0 = off)
    zoom: tuple[float, float] = (1.0, 1.0)  # zoom factor range (1, 1 = off); < 1 shrinks the content

    def __post_init__(self) -> None:
        if not 0 <= self.rotate_deg <= 180:
            raise ConfigError(f"The value of `rotate_deg` is {self.rotate_deg}, but must be `0 <= rotate_deg <= 180`")
        lo, hi = self.zoom
        if not 0 < lo <= hi:
            raise ConfigError(f"The value of `zoom` is {self.zoom}, but must be `0 < low <= high`")


@dataclass
class GeoSample:
    """One sample's arrays and labels."""

    image: NDArray[np.uint8]  # (H, W, 3)
    agl: NDArray[np.float32]  # (H, W) metres, NaN = no data
    scale: float  # pixels per metre
    angle: float  # radians


def rot90(s: GeoSample, k: int) -> GeoSample:
    """Rotate counter-clockwise by k·90°."""
    return GeoSample(np.rot90(s.image, k), np.rot90(s.agl, k), s.scale, float(wrap_angle(s.angle + k * math.pi / 2)))


def flip_columns(s: GeoSample) -> GeoSample:
    """Reverse the columns (a horizontal flip)."""
    return GeoSample(s.image[:, ::-1], s.agl[:, ::-1], s.scale, float(wrap_angle(-s.angle)))


def flip_rows(s: GeoSample) -> GeoSample:
    """Reverse the rows (a vertical flip)."""
    return GeoSample(s.image[::-1], s.agl[::-1], s.scale, float(wrap_angle(math.pi - s.angle)))


def affine(s: GeoSample, alpha: float, zoom: float) -> GeoSample:
    """Rotate the content counter-clockwise by ``alpha`` radians and zoom it by ``zoom`` about the centre.

    RGB is resampled bilinearly, AGL by nearest neighbour; pixels from outside the tile are no-data.
    """
    h, w = s.agl.shape
    c, sn = math.cos(alpha), math.sin(alpha)
    # Output (row, col) -> source (row, col): src = centre + Rᵀ (dst − centre) / zoom, written in (row, col).
    # With x = col, y = row: R = [[c, sn], [−sn, c]] on (x, y), so Rᵀ on (x, y) is [[c, −sn], [sn, c]].
    matrix = np.array([[c, sn], [-sn, c]]) / zoom  # acts on (row, col)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - matrix @ centre
    agl = ndimage.affine_transform(s.agl.astype(np.float32), matrix, offset, order=0, mode="constant", cval=np.nan)
    channels = [
        ndimage.affine_transform(s.image[..., i].astype(np.float32), matrix, offset, order=1, cval=0.0)
        for i in range(3)
    ]
    image = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
    return GeoSample(image, agl, s.scale * zoom, float(wrap_angle(s.angle + alpha)))


def augment(s: GeoSample, cfg: AugmentConfig, rng: np.random.Generator) -> GeoSample:
    """Draw and apply the configured augmentations; every draw uses ``rng``."""
    if cfg.rot90:
        s = rot90(s, int(rng.integers(0, 4)))
    if cfg.flip:
        if rng.random() < 0.5:
            s = flip_columns(s)
        if rng.random() < 0.5:
            s = flip_rows(s)
    alpha = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)) if cfg.rotate_deg > 0 else 0.0
    zoom = float(rng.uniform(*cfg.zoom)) if cfg.zoom != (1.0, 1.0) else 1.0
    if alpha != 0.0 or zoom != 1.0:
        s = affine(s, alpha, zoom)
    return GeoSample(np.ascontiguousarray(s.image), np.ascontiguousarray(s.agl), s.scale, s.angle)

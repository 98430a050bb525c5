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
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from geopose_ray.errors import ConfigError
from geopose_ray.geometry import wrap_angle


@dataclass(frozen=True)
class PhotometricConfig:
    """Colour and noise changes of the image alone (labels untouched), each off at its neutral value."""

    p: float = 0.8  # the probability that a sample gets the photometric changes at all
    brightness: float = 0.0  # an added shift uniform in ±brightness × 255
    contrast: float = 0.0  # a factor uniform in [1 − contrast, 1 + contrast] about the image's mean
    gamma: tuple[float, float] = (1.0, 1.0)  # a gamma uniform in the range, on intensities in [0, 1]
    hue: float = 0.0  # a hue rotation uniform in ±hue of the colour circle (about the grey axis)
    saturation: float = 0.0  # a factor uniform in [1 − saturation, 1 + saturation] about each pixel's grey
    noise: float = 0.0  # Gaussian noise of this standard deviation, in 0–255 units, per pixel and channel
    dropout: int = 0  # coarse dropout: up to this many rectangles filled with the image's mean colour
    dropout_size: tuple[float, float] = (0.02, 0.1)  # a rectangle's sides, as fractions of the image's

    def __post_init__(self) -> None:
        for name in ("gamma", "dropout_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        g, d = self.gamma, self.dropout_size
        checks = [
            ("p", self.p, 0 <= self.p <= 1, "0 <= p <= 1"),
            ("brightness", self.brightness, 0 <= self.brightness <= 1, "in [0, 1] (of 255)"),
            ("contrast", self.contrast, 0 <= self.contrast < 1, "in [0, 1)"),
            ("gamma", list(g), len(g) == 2 and 0 < g[0] <= g[1], "[low, high] with 0 < low <= high"),
            ("hue", self.hue, 0 <= self.hue <= 0.5, "in [0, 0.5] (of the colour circle)"),
            ("saturation", self.saturation, 0 <= self.saturation <= 1, "in [0, 1]"),
            ("noise", self.noise, self.noise >= 0, ">= 0 (in 0-255 units)"),
            ("dropout", self.dropout, self.dropout >= 0, "a count >= 0"),
            ("dropout_size", list(d), len(d) == 2 and 0 < d[0] <= d[1] <= 1, "[low, high], 0 < low <= high <= 1"),
        ]
        for name, value, ok, rule in checks:
            if not ok:
                raise ConfigError(f"The value of `photometric.{name}` is {value}, but must be {rule}")


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to draw for each training sample."""

    rot90: bool = True  # a random multiple of 90°
    flip: bool = True  # random column and row reversals
    rotate_deg: float = 0.0  # an arbitrary rotation, uniform in ±rotate_deg degrees (0 = off)
    zoom: tuple[float, float] = (1.0, 1.0)  # zoom factor range (1, 1 = off); < 1 shrinks the content
    photometric: PhotometricConfig | None = None  # colour and noise changes of the image; None = off

    def __post_init__(self) -> None:
        if isinstance(self.zoom, list):
            object.__setattr__(self, "zoom", tuple(self.zoom))
        if isinstance(self.photometric, dict):
            names = [f.name for f in fields(PhotometricConfig)]
            unknown = sorted(set(self.photometric) - set(names))
            if unknown:
                raise ConfigError(f"unknown key(s) {unknown} in `augment.photometric`; valid keys: {names}")
            object.__setattr__(self, "photometric", PhotometricConfig(**self.photometric))
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
    image = s.image
    if cfg.photometric is not None:  # drawn after the geometry, so turning it on moves no label
        image = photometric(np.ascontiguousarray(image), cfg.photometric, rng)
    return GeoSample(np.ascontiguousarray(image), np.ascontiguousarray(s.agl), s.scale, s.angle)


_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # luma weights


def hue_matrix(turn: float) -> NDArray[np.float32]:
    """The 3×3 RGB matrix rotating colours by ``turn`` of the colour circle about the grey axis (1, 1, 1)."""
    a = 2 * math.pi * turn
    c, s = math.cos(a), math.sin(a)
    k = 1 / math.sqrt(3)
    # Rodrigues' rotation about the unit axis (k, k, k).
    cross = np.array([[0, -k, k], [k, 0, -k], [-k, k, 0]])
    outer = np.full((3, 3), k * k)
    return (c * np.eye(3) + s * cross + (1 - c) * outer).astype(np.float32)


def photometric(image: NDArray[np.uint8], cfg: PhotometricConfig, rng: np.random.Generator) -> NDArray[np.uint8]:
    """Gamma, brightness, contrast, hue, saturation, noise and coarse dropout of an (H, W, 3) uint8 image, in
    that order, every draw from ``rng``. The scalar draws are made whether or not their effect is on, so one
    effect's randomness does not depend on which others are configured."""
    draws = rng.random(8)
    if draws[0] >= cfg.p:
        return image
    lo, hi = cfg.gamma
    if (lo, hi) != (1.0, 1.0):  # first, on the uint8 values: a 256-entry table
        table = 255 * (np.arange(256, dtype=np.float32) / 255) ** (lo + draws[5] * (hi - lo))
        x = table[image]
    else:
        x = image.astype(np.float32)
    if cfg.brightness > 0:
        x += (2 * draws[1] - 1) * cfg.brightness * 255
    if cfg.contrast > 0:
        mean = float(x.mean())
        x = (x - mean) * (1 + (2 * draws[2] - 1) * cfg.contrast) + mean
    if cfg.saturation > 0 or cfg.hue > 0:
        np.clip(x, 0, 255, out=x)
        if cfg.hue > 0:
            x = x @ hue_matrix((2 * draws[3] - 1) * cfg.hue).T
        if cfg.saturation > 0:
            grey = (x @ _GREY)[..., None]
            x = grey + (x - grey) * (1 + (2 * draws[4] - 1) * cfg.saturation)
    if cfg.noise > 0:
        x += cfg.noise * rng.standard_normal(x.shape, dtype=np.float32)
    if cfg.dropout > 0:
        h, w = x.shape[:2]
        fill = x.reshape(-1, 3).mean(axis=0)
        for _ in range(int(rng.integers(1, cfg.dropout + 1))):
            rh = max(1, round(h * rng.uniform(*cfg.dropout_size)))
            rw = max(1, round(w * rng.uniform(*cfg.dropout_size)))
            r, c = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
            x[r : r + rh, c : c + rw] = fill
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)

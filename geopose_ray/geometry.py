"""Flow geometry, the one convention used everywhere.

A tile's flow vector at a pixel of height ``h`` metres is ``v = h * s * (sin θ, cos θ)`` pixels, where ``s``
is the scale in pixels per metre and ``θ`` the angle in radians. The first component is the column offset
(x, to the right), the second the row offset (y, down the image). The angle is recovered as
``θ = atan2(x, y)`` wrapped to [0, 2π).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

TWO_PI = 2.0 * math.pi


def wrap_angle(angle: ArrayLike) -> NDArray[np.float64]:
    """Wrap radians to [0, 2π)."""
    wrapped = np.mod(np.asarray(angle, dtype=np.float64), TWO_PI)
    # np.mod can return exactly 2π for tiny negative inputs.
    return np.where(wrapped >= TWO_PI, 0.0, wrapped)


def angle_to_direction(angle: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Unit direction ``(x, y) = (sin θ, cos θ)`` (column, row) for an angle in radians."""
    a = np.asarray(angle, dtype=np.float64)
    return np.sin(a), np.cos(a)


def direction_to_angle(x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
    """Angle in [0, 2π) of a direction ``(x, y)`` (column, row); need not be normalised."""
    return wrap_angle(np.arctan2(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)))


def flow_field(agl: NDArray[np.floating], scale: float, angle: float) -> NDArray[np.float64]:
    """Flow vectors of a tile.

    Args:
        agl: heights above ground, metres, shape (H, W); NaN stays NaN.
        scale: pixels of flow per metre of height.
        angle: radians.

    Returns:
        (2, H, W) pixels: ``[0]`` column offsets, ``[1]`` row offsets.
    """
    return flow_vectors(np.asarray(agl, dtype=np.float64), scale, angle)


def flow_vectors(agl: NDArray[np.floating], scale: float, angle: float) -> NDArray[np.float64]:
    """Flow vectors of heights of any shape ``S`` (metres): shape (2, *S), pixels, (column, row)."""
    mag = np.asarray(agl, dtype=np.float64) * float(scale)
    return np.stack([mag * math.sin(angle), mag * math.cos(angle)])


def angle_error(pred: ArrayLike, true: ArrayLike) -> NDArray[np.float64]:
    """Absolute angular difference in radians, in [0, π]."""
    d = wrap_angle(np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64))
    return np.minimum(d, TWO_PI - d)

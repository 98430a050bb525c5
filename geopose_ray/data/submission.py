"""The submission writer and checker.

A submission holds, for each test stem, ``{stem}_AGL.tif`` (round(AGL metres × 100) as uint16 at the tile's
full size, negative heights clipped to 0, deflate-compressed) and ``{stem}_VFLOW.json`` (scale in pixels per
centimetre, angle in radians).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from geopose_ray.data.layout import agl_path, read_vflow, scan_dir, vflow_path, write_vflow
from geopose_ray.data.rasters import raster_info, write_agl
from geopose_ray.errors import DataError


def upsample_nearest(a: NDArray[np.floating], shape: tuple[int, int]) -> NDArray[np.floating]:
    """Nearest upsampling by an integer factor to ``shape`` (H, W)."""
    h, w = a.shape
    if shape[0] % h or shape[1] % w or shape[0] // h != shape[1] // w:
        raise DataError(f"prediction of {w}x{h} cannot be upsampled by one integer factor to {shape[1]}x{shape[0]}")
    k = shape[0] // h
    return a if k == 1 else np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def write_prediction(
    out_dir: str | Path,
    stem: str,
    agl_m: NDArray[np.floating],
    scale: float,
    angle: float,
    full_shape: tuple[int, int] = (2048, 2048),
) -> None:
    """Write one tile's prediction in the challenge format.

    Args:
        agl_m: predicted heights, metres, (h, w) at any resolution that divides ``full_shape``.
        scale: pixels per metre at the prediction's resolution; multiplied by the upsampling factor.
        angle: radians.
        full_shape: the test tile's (H, W).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = full_shape[0] / agl_m.shape[0]
    full = upsample_nearest(np.maximum(np.asarray(agl_m, dtype=np.float32), 0.0), full_shape)
    write_agl(agl_path(out_dir, stem), full)
    write_vflow(vflow_path(out_dir, stem), scale * k, angle)


def check_submission(sub_dir: str | Path, test_dir: str | Path) -> list[str]:
    """Problems with a submission directory against the test tiles: an empty list means complete and well formed.

    Checks that every test stem has an AGL raster of the RGB's size, 1-band uint16, and a VFLOW json with
    finite scale and angle; extra stems are reported too.
    """
    sub_dir, test_dir = Path(sub_dir), Path(test_dir)
    tests = {s: f for s, f in scan_dir(test_dir).items() if f.rgb}
    if not tests:
        raise DataError(f"{test_dir}: no *_RGB test tiles found; pass the test image directory")
    subs = scan_dir(sub_dir) if sub_dir.is_dir() else {}
    problems = []
    for stem, files in sorted(tests.items()):
        agl_p, vflow_p = agl_path(sub_dir, stem), vflow_path(sub_dir, stem)
        if not agl_p.exists():
            problems.append(f"{agl_p}: missing")
        else:
            try:
                a = raster_info(agl_p)
                r = raster_info(files.rgb[0])
                if (a.count, a.dtype) != (1, "uint16"):
                    problems.append(f"{agl_p}: is {a.count}-band {a.dtype}, must be 1-band uint16 cm")
                if (a.width, a.height) != (r.width, r.height):
                    problems.append(f"{agl_p}: is {a.width}x{a.height}, the tile is {r.width}x{r.height}")
            except DataError as e:
                problems.append(str(e))
        try:
            scale, angle = read_vflow(vflow_p)
            if not (math.isfinite(scale) and math.isfinite(angle)):
                problems.append(f"{vflow_p}: scale {scale / 100} or angle {angle} is not finite")
        except DataError as e:
            problems.append(str(e))
    problems += [f"{sub_dir / s}: not a test stem" for s in sorted(set(subs) - set(tests))]
    return problems

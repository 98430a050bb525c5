"""Raster I/O of the challenge formats. The only module that imports rasterio.

RGB tiles are 3-band uint8 JPEG 2000 (``.j2k``) or GeoTIFF (``.tif``); AGL tiles are 1-band uint16 GeoTIFFs in
centimetres with 65535 as no-data. Inside the project heights are float32 metres with NaN for no-data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from numpy.typing import NDArray
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from geopose_ray.errors import DataError

AGL_NODATA = 65535
AGL_MAX_CM = AGL_NODATA - 1


@dataclass(frozen=True)
class RasterInfo:
    """What a raster file's header says."""

    width: int
    height: int
    count: int
    dtype: str
    driver: str


def _open(path: Path) -> rasterio.DatasetReader:
    try:
        return rasterio.open(path)
    except RasterioError as e:
        raise DataError(f"{path}: cannot be opened as a raster ({e}); re-download or regenerate the file") from e


def raster_info(path: str | Path, decode: bool = False) -> RasterInfo:
    """Read a raster's header; with ``decode`` also decode every pixel, which catches truncated files."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with _open(path) as ds:
            info = RasterInfo(ds.width, ds.height, ds.count, ds.dtypes[0], ds.driver)
            if decode:
                _decode(ds, path)
    return info


def _decode(ds: rasterio.DatasetReader, path: Path) -> NDArray[np.generic]:
    try:
        return ds.read()
    except RasterioError as e:
        raise DataError(
            f"{path}: pixel data cannot be decoded, the file is truncated or corrupt ({e}); "
            "re-download or regenerate it"
        ) from e


def _read(path: Path) -> NDArray[np.generic]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with _open(path) as ds:
            return _decode(ds, path)


def read_rgb(path: str | Path) -> NDArray[np.uint8]:
    """Read an RGB tile as (H, W, 3) uint8."""
    path = Path(path)
    data = _read(path)
    if data.shape[0] != 3 or data.dtype != np.uint8:
        raise DataError(
            f"{path}: RGB must be 3-band uint8, found {data.shape[0]}-band {data.dtype}; convert it to 8-bit RGB"
        )
    return np.ascontiguousarray(np.moveaxis(data, 0, -1))


def read_agl_cm(path: str | Path) -> NDArray[np.uint16]:
    """Read an AGL tile as stored: (H, W) uint16 centimetres, 65535 = no data."""
    path = Path(path)
    data = _read(path)
    if data.shape[0] != 1 or data.dtype != np.uint16:
        raise DataError(
            f"{path}: AGL must be 1-band uint16 centimetres, found {data.shape[0]}-band {data.dtype}; "
            "rewrite it as uint16 cm with 65535 for no data"
        )
    return data[0]


def agl_cm_to_m(agl_cm: NDArray[np.uint16]) -> NDArray[np.float32]:
    """uint16 centimetres (65535 = no data) to float32 metres (NaN = no data)."""
    metres = agl_cm.astype(np.float32) / np.float32(100.0)
    metres[agl_cm == AGL_NODATA] = np.nan
    return metres


def agl_m_to_cm(agl_m: NDArray[np.floating]) -> NDArray[np.uint16]:
    """Metres (NaN = no data) to uint16 centimetres: rounded, clipped to [0, 65534], NaN to 65535."""
    cm = np.rint(np.asarray(agl_m, dtype=np.float64) * 100.0)
    nodata = ~np.isfinite(cm)
    out = np.clip(np.where(nodata, 0.0, cm), 0, AGL_MAX_CM).astype(np.uint16)
    out[nodata] = AGL_NODATA
    return out


def read_agl(path: str | Path) -> NDArray[np.float32]:
    """Read an AGL tile as (H, W) float32 metres, NaN where no data."""
    return agl_cm_to_m(read_agl_cm(path))


def write_rgb(path: str | Path, rgb: NDArray[np.uint8]) -> None:
    """Write an (H, W, 3) uint8 tile: lossless JPEG 2000 codestream for ``.j2k``, deflate GeoTIFF for ``.tif``."""
    path = Path(path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(f"{path}: RGB to write must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    if path.suffix.lower() == ".j2k":
        opts = {"driver": "JP2OpenJPEG", "codec": "J2K", "reversible": "YES", "quality": "100"}
    elif path.suffix.lower() in (".tif", ".tiff"):
        opts = {"driver": "GTiff", "compress": "deflate"}
    else:
        raise DataError(f"{path}: unknown RGB extension {path.suffix!r}; use .j2k or .tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", width=w, height=h, count=3, dtype="uint8", **opts) as ds:
            ds.write(np.moveaxis(rgb, -1, 0))


def write_agl_cm(path: str | Path, agl_cm: NDArray[np.uint16]) -> None:
    """Write (H, W) uint16 centimetres as a deflate-compressed GeoTIFF with 65535 as no-data."""
    if agl_cm.ndim != 2 or agl_cm.dtype != np.uint16:
        raise DataError(f"{path}: AGL to write must be (H, W) uint16 cm, got {agl_cm.shape} {agl_cm.dtype}")
    h, w = agl_cm.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint16",
            nodata=AGL_NODATA, compress="deflate",
        ) as ds:  # fmt: skip
            ds.write(agl_cm, 1)


def write_agl(path: str | Path, agl_m: NDArray[np.floating]) -> None:
    """Write (H, W) metres (NaN = no data) in the challenge's uint16 centimetre format."""
    write_agl_cm(path, agl_m_to_cm(agl_m))

"""Raster and json I/O of the challenge formats: units, no-data and round trips through real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geopose_ray.data.layout import read_vflow, write_vflow
from geopose_ray.data.rasters import (
    AGL_NODATA,
    agl_cm_to_m,
    agl_m_to_cm,
    raster_info,
    read_agl,
    read_agl_cm,
    read_rgb,
    write_agl,
    write_agl_cm,
    write_rgb,
)
from geopose_ray.errors import DataError


def test_every_centimetre_value_survives_metres_and_back() -> None:
    """All 65,536 uint16 codes: cm -> m -> cm is the identity, and only 65535 becomes NaN."""
    cm = np.arange(65536, dtype=np.uint16)
    m = agl_cm_to_m(cm)
    assert m.dtype == np.float32
    assert np.isnan(m[AGL_NODATA]) and np.isfinite(m[:AGL_NODATA]).all()
    assert m[1234] == np.float32(12.34)
    np.testing.assert_array_equal(agl_m_to_cm(m), cm)


def test_metres_to_cm_rounds_clips_and_marks_nodata() -> None:
    m = np.array([-3.0, 0.004, 0.005001, 12.345, 700.0, np.nan, np.inf], dtype=np.float64)
    np.testing.assert_array_equal(agl_m_to_cm(m), [0, 0, 1, 1234, 65534, 65535, 65535])


def test_agl_file_round_trip_keeps_nodata_and_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20000, (48, 40)).astype(np.uint16)
    cm[5:9, 3:7] = AGL_NODATA
    p = tmp_path / "JAX_ABCDEF_AGL.tif"
    write_agl_cm(p, cm)
    np.testing.assert_array_equal(read_agl_cm(p), cm)
    metres = read_agl(p)
    assert np.isnan(metres[5:9, 3:7]).all()
    np.testing.assert_allclose(metres[0, 0], cm[0, 0] / 100, rtol=1e-7)
    with rasterio.open(p) as ds:
        assert ds.nodata == AGL_NODATA and ds.profile["compress"] == "deflate" and ds.dtypes[0] == "uint16"
    # And through metres: writing what was read gives the same file contents.
    p2 = tmp_path / "copy_AGL.tif"
    write_agl(p2, metres)
    np.testing.assert_array_equal(read_agl_cm(p2), cm)


@pytest.mark.parametrize("ext", [".j2k", ".tif"])
def test_rgb_round_trip_is_lossless(tmp_path: Path, ext: str) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (40, 56, 3)).astype(np.uint8)
    p = tmp_path / f"OMA_ABCDEF_RGB{ext}"
    write_rgb(p, rgb)
    np.testing.assert_array_equal(read_rgb(p), rgb)
    info = raster_info(p)
    assert (info.width, info.height, info.count, info.dtype) == (56, 40, 3, "uint8")
    assert info.driver == ("JP2OpenJPEG" if ext == ".j2k" else "GTiff")


def test_j2k_is_a_jpeg2000_codestream(tmp_path: Path) -> None:
    """The challenge's .j2k files are raw codestreams (SOC marker FF4F), not JP2 boxes."""
    p = tmp_path / "ARG_ABCDEF_RGB.j2k"
    write_rgb(p, np.zeros((32, 32, 3), dtype=np.uint8))
    assert p.read_bytes()[:2] == b"\xff\x4f"


def test_wrong_band_count_and_dtype_are_named(tmp_path: Path) -> None:
    p = tmp_path / "one_band.tif"
    with rasterio.open(p, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as ds:
        ds.write(np.zeros((1, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"one_band\.tif.*3-band uint8, found 1-band uint8"):
        read_rgb(p)
    f = tmp_path / "float_AGL.tif"
    with rasterio.open(f, "w", driver="GTiff", width=8, height=8, count=1, dtype="float32") as ds:
        ds.write(np.zeros((1, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"float_AGL\.tif.*uint16.*float32"):
        read_agl(f)


@pytest.mark.parametrize("ext", [".j2k", ".tif"])
def test_truncated_image_raises_a_data_error(tmp_path: Path, ext: str) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    p = tmp_path / f"ATL_ABCDEF_RGB{ext}"
    write_rgb(p, rgb)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"ATL_ABCDEF_RGB"):
        read_rgb(p)
    with pytest.raises(DataError):
        raster_info(p, decode=True)


def test_vflow_units_are_converted_both_ways(tmp_path: Path) -> None:
    p = tmp_path / "JAX_ABCDEF_VFLOW.json"
    write_vflow(p, 1.5, 2.0)
    raw = json.loads(p.read_text())
    assert raw == {"scale": 0.015, "angle": 2.0}
    scale, angle = read_vflow(p)
    assert scale == pytest.approx(1.5, rel=1e-15) and angle == 2.0
    p.write_text(json.dumps({"scale": 0.0123456789, "angle": 6.2}))
    assert read_vflow(p)[0] == pytest.approx(1.23456789, rel=1e-15)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"scale": 0.01}', r"missing key\(s\) \['angle'\]"),
        ('{"scale": "a", "angle": 1}', "scale is 'a', not a number"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_vflow_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "OMA_ABCDEF_VFLOW.json"
    p.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_vflow(p)
    assert str(p) in str(err.value)

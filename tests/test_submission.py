"""The submission writer and checker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geopose_ray.cli import main
from geopose_ray.data.layout import scan_dir
from geopose_ray.data.rasters import read_agl_cm, write_agl_cm
from geopose_ray.data.submission import check_submission, upsample_nearest, write_prediction
from geopose_ray.errors import DataError


def test_writer_upsamples_clips_rounds_and_converts_units(tmp_path: Path) -> None:
    pred = np.array([[1.234, -2.0], [0.0151, 700.0]], dtype=np.float32)
    write_prediction(tmp_path, "JAX_ABCDEF", pred, scale=0.75, angle=1.25, full_shape=(8, 8))
    cm = read_agl_cm(tmp_path / "JAX_ABCDEF_AGL.tif")
    assert cm.shape == (8, 8) and cm.dtype == np.uint16
    np.testing.assert_array_equal(cm[:4, :4], 123)  # nearest upsampling, round(m*100)
    np.testing.assert_array_equal(cm[:4, 4:], 0)  # negative heights clipped to 0
    np.testing.assert_array_equal(cm[4:, :4], 2)
    np.testing.assert_array_equal(cm[4:, 4:], 65534)  # capped below the no-data code
    with rasterio.open(tmp_path / "JAX_ABCDEF_AGL.tif") as ds:
        assert ds.profile["compress"] == "deflate"
    raw = json.loads((tmp_path / "JAX_ABCDEF_VFLOW.json").read_text())
    assert raw["angle"] == 1.25
    assert raw["scale"] == pytest.approx(0.75 * 4 / 100, rel=1e-15)  # px/m at 1/4 res -> px/cm at full res


def test_upsampling_needs_one_integer_factor() -> None:
    a = np.arange(4.0).reshape(2, 2)
    np.testing.assert_array_equal(upsample_nearest(a, (4, 4)), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    with pytest.raises(DataError, match="one integer factor"):
        upsample_nearest(a, (5, 4))
    with pytest.raises(DataError, match="one integer factor"):
        upsample_nearest(a, (4, 6))


@pytest.fixture
def submission(dataset: Path, tmp_path: Path) -> Path:
    sub = tmp_path / "sub"
    for stem in scan_dir(dataset / "test"):
        write_prediction(sub, stem, np.ones((32, 32), dtype=np.float32), 0.5, 1.0, full_shape=(64, 64))
    return sub


def test_a_complete_submission_passes(submission: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_submission(submission, dataset / "test") == []
    assert main(["check-submission", str(submission), "--test", str(dataset / "test")]) == 0
    assert "complete and well formed" in capsys.readouterr().out


def test_every_defect_is_found(submission: Path, dataset: Path) -> None:
    stems = sorted(scan_dir(dataset / "test"))
    (submission / f"{stems[0]}_AGL.tif").unlink()
    write_agl_cm(submission / f"{stems[1]}_AGL.tif", np.zeros((32, 32), dtype=np.uint16))
    (submission / f"{stems[2]}_VFLOW.json").write_text('{"scale": NaN, "angle": 1}')
    with rasterio.open(
        submission / f"{stems[3]}_AGL.tif", "w", driver="GTiff", width=64, height=64, count=1, dtype="float32"
    ) as ds:
        ds.write(np.zeros((1, 64, 64), dtype=np.float32))
    shutil.copy(submission / f"{stems[3]}_VFLOW.json", submission / "ARG_EXTRAA_VFLOW.json")
    problems = check_submission(submission, dataset / "test")
    text = "\n".join(problems)
    assert f"{stems[0]}_AGL.tif: missing" in text
    assert f"{stems[1]}_AGL.tif: is 32x32, the tile is 64x64" in text
    assert f"{stems[2]}_VFLOW.json: scale nan or angle 1.0 is not finite" in text
    assert f"{stems[3]}_AGL.tif: is 1-band float32" in text
    assert "ARG_EXTRAA: not a test stem" in text
    assert len(problems) == 5

"""End to end through real files: ``score_dirs`` and ``geopose-ray score`` against the naive reference."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from reference_score import RefReport, RefTile, reference_score

from geopose_ray.cli import main
from geopose_ray.data.layout import agl_path, read_vflow, vflow_path, write_vflow
from geopose_ray.data.rasters import AGL_NODATA, read_agl, read_agl_cm, write_agl
from geopose_ray.data.submission import upsample_nearest, write_prediction
from geopose_ray.errors import DataError
from geopose_ray.metrics import ScoreReport
from geopose_ray.scoring import score_dirs

SIZE = 16
STEMS = ("JAX_AAAAAA", "JAX_BBBBBB", "JAX_CCCCCC", "OMA_DDDDDD", "OMA_EEEEEE")


def write_tile(directory: Path, stem: str, agl_m: np.ndarray, scale: float, angle: float) -> None:
    """One tile in the challenge layout: ``_AGL.tif`` (uint16 cm, 65535 for NaN) and ``_VFLOW.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_agl(agl_path(directory, stem), agl_m)
    write_vflow(vflow_path(directory, stem), scale, angle)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Truth and prediction dirs: 5 tiles of 16 px over JAX and OMA, no-data (65535) pixels in both."""
    rng = np.random.default_rng(2021)
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for stem in STEMS:
        h = rng.uniform(0.0, 200.0, (SIZE, SIZE))
        h[rng.random((SIZE, SIZE)) < 0.3] = 0.0
        h[rng.random((SIZE, SIZE)) < 0.15] = np.nan
        scale, angle = float(rng.uniform(0.5, 3.0)), float(rng.uniform(0.0, 2 * math.pi))
        write_tile(truth, stem, h, scale, angle)
        p = h + rng.normal(0.0, 15.0, h.shape)
        p[rng.random((SIZE, SIZE)) < 0.15] = np.nan
        write_tile(pred, stem, p, scale * float(rng.uniform(0.8, 1.2)), angle + float(rng.normal(0.0, 0.3)))
    return truth, pred


def reference_of_dirs(truth: Path, pred: Path, stems: tuple[str, ...] = STEMS) -> RefReport:
    """The naive reference on the arrays as read back from disk (NaN for 65535), missing files as None."""
    tiles = []
    for stem in stems:
        h = read_agl(agl_path(truth, stem))
        s, a = read_vflow(vflow_path(truth, stem))
        if agl_path(pred, stem).exists() and vflow_path(pred, stem).exists():
            p: np.ndarray | None = read_agl(agl_path(pred, stem))
            sp, ap = read_vflow(vflow_path(pred, stem))
        else:
            p, sp, ap = None, math.nan, math.nan
        tiles.append(RefTile(stem, stem[:3], h, s, a, p, sp, ap))
    return reference_score(tiles)


def assert_report_matches(report: ScoreReport, ref: RefReport, tol: float = 1e-6) -> None:
    """Per-city R², scores and pixel counts and the final score agree with the reference to ``tol``."""
    assert sorted(report.cities) == sorted(ref.cities)
    for city, r in ref.cities.items():
        c = report.cities[city]
        assert c.pixels == r.pixels
        assert c.agl_r2 == pytest.approx(r.agl_r2, abs=tol)
        assert c.flow_r2 == pytest.approx(r.flow_r2, abs=tol)
        assert c.score == pytest.approx(r.score, abs=tol)
    assert report.score == pytest.approx(ref.score, abs=tol)


def _flat(report: ScoreReport) -> dict[str, object]:
    """Every number of a report, NaN made comparable, for exact equality of two reports."""
    out: dict[str, object] = {"score": report.score}
    for city, c in report.cities.items():
        for k, v in asdict(c).items():
            out[f"{city}.{k}"] = "nan" if isinstance(v, float) and math.isnan(v) else v
    return out


def test_nodata_written_in_truth_and_pred(dirs: tuple[Path, Path]) -> None:
    """The fixture really exercises no-data: 65535 on disk in both dirs, NaN after reading."""
    truth, pred = dirs
    for d in (truth, pred):
        cm = read_agl_cm(agl_path(d, STEMS[0]))
        assert (cm == AGL_NODATA).any()
        assert np.array_equal(np.isnan(read_agl(agl_path(d, STEMS[0]))), cm == AGL_NODATA)


def test_score_dirs_matches_reference_and_workers_agree(dirs: tuple[Path, Path]) -> None:
    """score_dirs equals the naive reference on the read-back arrays; 1 and 2 workers agree exactly."""
    truth, pred = dirs
    one = score_dirs(truth, pred, workers=1)
    two = score_dirs(truth, pred, workers=2)
    assert _flat(one) == _flat(two)
    assert_report_matches(one, reference_of_dirs(truth, pred))
    assert one.cities["JAX"].tiles == 3 and one.cities["OMA"].tiles == 2
    assert all(not c.failures for c in one.cities.values())
    assert 0.0 < one.score < 1.0


def test_perfect_submission_scores_one(dirs: tuple[Path, Path]) -> None:
    """Scoring the truth against itself gives exactly 1 per city and overall."""
    truth, _ = dirs
    report = score_dirs(truth, truth, workers=1)
    assert report.score == 1.0
    assert all(c.score == 1.0 for c in report.cities.values())


def test_synthetic_dataset_truth_scores_one(dataset: Path) -> None:
    """The synthetic test_truth/ (real layout, all four cities) scored against itself is perfect."""
    report = score_dirs(dataset / "test_truth", dataset / "test_truth", workers=1)
    assert sorted(report.cities) == ["ARG", "ATL", "JAX", "OMA"]
    assert report.score == 1.0


@pytest.mark.parametrize("which", ["agl", "vflow"])
def test_missing_prediction_file_scores_city_zero(dirs: tuple[Path, Path], which: str) -> None:
    """A missing _AGL.tif or _VFLOW.json scores that city 0 and names the stem; the other city is intact."""
    truth, pred = dirs
    before = score_dirs(truth, pred, workers=1)
    victim = "OMA_EEEEEE"
    (agl_path(pred, victim) if which == "agl" else vflow_path(pred, victim)).unlink()
    report = score_dirs(truth, pred, workers=1)
    oma = report.cities["OMA"]
    assert oma.score == 0.0
    assert oma.failures == [f"{victim}: prediction file missing"]
    assert oma.pixels == before.cities["OMA"].pixels
    assert report.cities["JAX"].score == before.cities["JAX"].score
    assert report.cities["JAX"].failures == []
    assert report.score == pytest.approx(before.cities["JAX"].score / 2, abs=1e-15)
    assert_report_matches(report, reference_of_dirs(truth, pred))


@pytest.mark.parametrize("bad", [{"scale": math.nan}, {"angle": math.nan}])
def test_nan_in_prediction_json_scores_city_zero(dirs: tuple[Path, Path], bad: dict[str, float]) -> None:
    """A _VFLOW.json with NaN scale or angle (json's NaN token) scores that city 0 with the reason listed."""
    truth, pred = dirs
    victim = "JAX_BBBBBB"
    raw = json.loads(vflow_path(pred, victim).read_text())
    raw.update(bad)
    vflow_path(pred, victim).write_text(json.dumps(raw))
    report = score_dirs(truth, pred, workers=1)
    jax = report.cities["JAX"]
    assert jax.score == 0.0
    assert len(jax.failures) == 1 and jax.failures[0].startswith(f"{victim}: ")
    assert "not finite" in jax.failures[0]
    assert report.cities["OMA"].failures == []
    assert report.cities["OMA"].score > 0.0
    assert_report_matches(report, reference_of_dirs(truth, pred))


def test_unreadable_prediction_scores_city_zero(dirs: tuple[Path, Path]) -> None:
    """A corrupt prediction AGL is a failure of its city, not a crash of the scorer."""
    truth, pred = dirs
    agl_path(pred, "JAX_AAAAAA").write_bytes(b"not a tiff")
    report = score_dirs(truth, pred, workers=1)
    assert report.cities["JAX"].score == 0.0
    assert report.cities["JAX"].failures[0].startswith("JAX_AAAAAA: unreadable prediction")
    assert report.cities["OMA"].score > 0.0


def test_half_resolution_prediction_upsampled(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    """write_prediction at half resolution = writing the nearest-upsampled array (negatives clipped to 0) with
    the scale doubled; scoring either gives the same report, equal to the reference."""
    truth, _ = dirs
    rng = np.random.default_rng(5)
    half_dir, full_dir = tmp_path / "half", tmp_path / "full"
    for stem in STEMS:
        half = rng.integers(-500, 20000, (SIZE // 2, SIZE // 2)).astype(np.float64) / 100.0  # whole cm
        half[rng.random(half.shape) < 0.1] = np.nan
        scale, angle = float(rng.uniform(0.25, 1.5)), float(rng.uniform(0, 2 * math.pi))
        write_prediction(half_dir, stem, half, scale, angle, full_shape=(SIZE, SIZE))

        raw = json.loads(vflow_path(half_dir, stem).read_text())
        assert raw["scale"] == pytest.approx(2 * scale / 100.0, rel=1e-15)  # px/cm at full resolution
        assert raw["angle"] == angle

        full = np.maximum(np.repeat(np.repeat(half, 2, axis=0), 2, axis=1), 0.0)
        np.testing.assert_array_equal(full, np.maximum(upsample_nearest(half, (SIZE, SIZE)), 0.0))
        got = read_agl(agl_path(half_dir, stem))
        assert got.shape == (SIZE, SIZE)
        np.testing.assert_allclose(got, full, atol=1e-5)  # equal_nan by default
        write_tile(full_dir, stem, full, 2 * scale, angle)

    from_half = score_dirs(truth, half_dir, workers=1)
    from_full = score_dirs(truth, full_dir, workers=1)
    assert _flat(from_half) == _flat(from_full)
    assert_report_matches(from_half, reference_of_dirs(truth, half_dir))


def test_cli_score_json(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """``geopose-ray score --json`` prints the report as JSON; exit 0; the final score matches."""
    truth, pred = dirs
    code = main(["score", "--truth", str(truth), "--pred", str(pred), "--json", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    ref = reference_of_dirs(truth, pred)
    assert data["score"] == pytest.approx(ref.score, abs=1e-6)
    assert sorted(data["cities"]) == ["JAX", "OMA"]
    for city, r in ref.cities.items():
        assert data["cities"][city]["score"] == pytest.approx(r.score, abs=1e-6)


def test_cli_score_table(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json a table ends with the final score to 6 decimals."""
    truth, pred = dirs
    assert main(["score", "--truth", str(truth), "--pred", str(pred), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    score = score_dirs(truth, pred, workers=1).score
    assert out.strip().splitlines()[-1].endswith(f"{score:.6f}")


@pytest.mark.parametrize("missing", ["pred", "truth"])
def test_cli_score_missing_dir(
    tmp_path: Path, dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """A nonexistent directory: exit code 2, one error line on stderr naming it, no traceback."""
    truth, pred = dirs
    nowhere = tmp_path / "nowhere"
    args = ["score", "--truth", str(truth), "--pred", str(pred), "--workers", "1"]
    args[args.index(str(pred) if missing == "pred" else str(truth))] = str(nowhere)
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("geopose-ray score: error:")
    assert str(nowhere) in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_extra_prediction_files_are_ignored(dirs: tuple[Path, Path]) -> None:
    """Only truth stems are scored: an extra stem in the prediction dir changes nothing."""
    truth, pred = dirs
    before = score_dirs(truth, pred, workers=1)
    shutil.copy(agl_path(pred, "JAX_AAAAAA"), agl_path(pred, "ATL_ZZZZZZ"))
    shutil.copy(vflow_path(pred, "JAX_AAAAAA"), vflow_path(pred, "ATL_ZZZZZZ"))
    assert _flat(score_dirs(truth, pred, workers=1)) == _flat(before)


def test_truth_tile_without_its_vflow_is_an_error_not_a_skip(dataset: Path, tmp_path: Path) -> None:
    """A truth directory with an _AGL.tif but no _VFLOW.json must not be scored silently without that tile."""
    truth = tmp_path / "truth"
    shutil.copytree(dataset / "test_truth", truth)
    victim = sorted(truth.glob("*_VFLOW.json"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"lack their _AGL\.tif or _VFLOW\.json .*run geopose-ray validate"):
        score_dirs(truth, dataset / "test_truth", workers=1)

"""The training cache: resampling and units, skip-if-done, interruption, corruption, the torch dataset."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from geopose_ray.cli import main
from geopose_ray.data.cache import TrainingCache, downsample_nearest, downsample_rgb, prepare_cache
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.data.layout import CITIES, read_vflow
from geopose_ray.data.rasters import read_agl_cm, read_rgb
from geopose_ray.data.synth import synthesize
from geopose_ray.errors import DataError


def test_downsampling_rules() -> None:
    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    small = downsample_rgb(rgb, 2)
    expected = rgb.astype(float).reshape(2, 2, 2, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(small, np.floor(expected + 0.5).astype(np.uint8))
    agl = np.arange(16, dtype=np.uint16).reshape(4, 4)
    np.testing.assert_array_equal(downsample_nearest(agl, 2), [[5, 7], [13, 15]])
    assert downsample_nearest(agl, 1) is agl


def test_entries_match_the_decoded_originals(dataset: Path, cache: Path) -> None:
    c = TrainingCache(cache)
    assert len(c) == 16 and c.downsample == 2 and c.verify() == []
    for row in c.rows:
        s = c.load(row.stem)
        rgb = read_rgb(dataset / "train" / row.rgb)
        agl_cm = read_agl_cm(dataset / "train" / row.agl)
        area = rgb.astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        assert np.abs(s.image.astype(np.float64) - area).max() <= 0.5
        np.testing.assert_array_equal(np.isnan(s.agl), agl_cm[1::2, 1::2] == 65535)  # no-data kept
        ok = ~np.isnan(s.agl)
        np.testing.assert_allclose(s.agl[ok], agl_cm[1::2, 1::2][ok] / 100, rtol=1e-6)
        scale, angle = read_vflow(dataset / "train" / row.vflow)
        assert s.scale == pytest.approx(scale / 2, rel=1e-12)  # scale divided by K
        assert s.angle == angle and s.gsd == row.gsd and CITIES[s.city] == row.city
        assert isinstance(np.load(cache / "entries" / f"{row.stem}.rgb.npy", mmap_mode="r"), np.memmap)


def test_rerun_skips_complete_entries_and_rebuilds_broken_ones(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    first = prepare_cache(dataset / "train", out, 2, folds=4, workers=1)
    assert (first.written, first.skipped) == (16, 0)
    again = prepare_cache(dataset / "train", out, 2, folds=4, workers=1)
    assert (again.written, again.skipped) == (0, 16)
    stems = [r.stem for r in TrainingCache(out).rows]
    (out / "entries" / f"{stems[0]}.json").unlink()  # interrupted before the entry was committed
    arr = out / "entries" / f"{stems[1]}.agl.npy"  # bit rot in a committed entry
    data = bytearray(arr.read_bytes())
    data[-1] ^= 0xFF
    arr.write_bytes(bytes(data))
    problems = TrainingCache(out).verify()
    assert len(problems) == 2 and "checksum mismatch" in " ".join(problems)
    fixed = prepare_cache(dataset / "train", out, 2, folds=4, workers=2)
    assert (fixed.written, fixed.skipped) == (2, 14)
    assert TrainingCache(out).verify() == []


def test_a_different_downsample_into_the_same_cache_is_refused(cache: Path, dataset: Path) -> None:
    with pytest.raises(DataError, match=r"downsample 2.*use another --out"):
        prepare_cache(dataset / "train", cache, 4, workers=1)


def test_undecodable_tile_is_reported_and_the_rest_is_written(dataset: Path, tmp_path: Path) -> None:
    src = tmp_path / "train"
    shutil.copytree(dataset / "train", src)
    bad = sorted(src.glob("*_RGB.j2k"))[3]
    bad.write_bytes(bad.read_bytes()[:200])
    result = prepare_cache(src, tmp_path / "c", 2, workers=1)
    assert result.written == 15 and len(result.errors) == 1 and bad.name in result.errors[0]
    assert not (tmp_path / "c" / "manifest.csv").exists()  # an incomplete cache has no manifest


def test_kill_mid_prepare_then_rerun_completes(tmp_path: Path) -> None:
    """SIGKILL a real `geopose-ray prepare` half way: no committed entry is broken, a rerun finishes."""
    src = tmp_path / "data"
    synthesize(src, tiles=24, size=512, seed=7, workers=2)
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "geopose_ray.cli",
        "prepare",
        str(src / "train"),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / "entries").glob("*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = list((out / "entries").glob("*.json"))
    assert 3 <= len(committed) < 24, "the kill should land mid-way"
    for meta in committed:
        stem = meta.name[: -len(".json")]
        assert json.loads(meta.read_text())["stem"] == stem
        assert np.load(out / "entries" / f"{stem}.rgb.npy").shape == (256, 256, 3)
    assert not (out / "manifest.csv").exists()
    (out / "entries" / ".JAX_STALE.rgb.npy.tmp-99999").write_bytes(b"half")  # as a kill mid-write leaves
    assert main(["prepare", str(src / "train"), "--out", str(out), "--workers", "2"]) == 0
    c = TrainingCache(out)
    assert len(c) == 24 and c.verify() == []
    assert not list((out / "entries").glob(".*tmp*"))  # no temporary files left behind by the rerun


def test_torch_dataset_samples(cache: Path) -> None:
    ds = GeoposeDataset(cache)
    assert len(ds) == 16
    s = ds[0]
    assert set(s) == {"image", "agl", "valid", "angle", "scale", "gsd", "city", "index", "skipped"}
    assert s["skipped"].item() == 0  # every tile of this cache is readable
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.uint8
    assert s["agl"].shape == (1, 32, 32) and s["agl"].dtype == torch.float32
    assert s["valid"].dtype == torch.bool
    assert torch.all(s["agl"][~s["valid"]] == 0)
    row = TrainingCache(cache).rows[0]
    assert s["angle"].item() == pytest.approx(row.angle) and s["scale"].item() == pytest.approx(row.scale / 2)
    fold0 = GeoposeDataset(cache, folds=[0])
    assert 0 < len(fold0) < 16 and all(r.fold == 0 for r in fold0.rows)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 3, 32, 32)

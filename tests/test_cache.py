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


def test_entries_record_valid_pixels_and_height_sums(dataset: Path, cache: Path) -> None:
    """valid_px and agl_sum at the cached resolution, equal to what a reader computes from the arrays."""
    c = TrainingCache(cache)
    for row in c.rows:
        meta = json.loads((cache / "entries" / f"{row.stem}.json").read_text())
        agl_cm = read_agl_cm(dataset / "train" / row.agl)[1::2, 1::2]
        assert meta["valid_px"] == int((agl_cm != 65535).sum())
        agl = c.load(row.stem).agl
        assert meta["agl_sum"] == float(agl[np.isfinite(agl)].sum(dtype=np.float64))
        assert meta["agl_sum"] == pytest.approx(agl_cm[agl_cm != 65535].sum() / 100, rel=1e-6)


def test_entries_of_an_older_prepare_stay_usable_and_a_rerun_adds_the_sums(
    cache: Path, dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    info = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({k: info[k] for k in ("format", "downsample", "source")}))
    for p in (out / "entries").glob("*.json"):
        meta = json.loads(p.read_text())
        del meta["valid_px"], meta["agl_sum"]
        p.write_text(json.dumps(meta))
    c = TrainingCache(out)
    assert c.verify() == [] and c.load(c.rows[0].stem).agl.shape == (32, 32)
    again = prepare_cache(dataset / "train", out, 2, folds=4, workers=1)
    assert (again.written, again.skipped) == (0, 16)
    for p in (out / "entries").glob("*.json"):
        assert json.loads(p.read_text()) == json.loads((cache / "entries" / p.name).read_text())
    assert json.loads((out / "cache.json").read_text())["folds"] == 4  # the folds are recorded now


def test_size_estimate_matches_the_bytes_written(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    seen = []
    result = prepare_cache(dataset / "train", out, 2, folds=4, workers=1, on_estimate=seen.append)
    estimate = result.estimate
    assert estimate is not None and seen == [estimate]
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert (estimate.tiles, estimate.to_write) == (16, 16)
    assert abs(estimate.bytes - written) <= 0.03 * written, (estimate.bytes, written)
    assert set(estimate.options) == {4, 8, 16} and estimate.options[4] < estimate.bytes / 2  # 64 px tiles
    assert estimate.describe().startswith(f"16 tiles, {estimate.bytes / 1e3:.1f} kB at downsample 2 into {out} (")
    (out / "entries" / f"{TrainingCache(out).rows[0].stem}.json").unlink()
    again = prepare_cache(dataset / "train", out, 2, folds=4, workers=1).estimate
    assert again is not None and again.to_write == 1 and again.bytes < estimate.bytes / 8
    assert "16 tiles (1 to write), " in again.describe()


def test_a_disk_too_small_is_refused_with_the_figures() -> None:
    from geopose_ray.data.cache import CacheEstimate, format_bytes

    est = CacheEstimate(Path("/data/cache"), 1, 3000, 3000, 124 * 10**9, 80_300_000_000, {2: 31 * 10**9, 4: 8 * 10**9})
    assert est.describe() == "3,000 tiles, 124.0 GB at downsample 1 into /data/cache (80.3 GB free)"
    assert est.refusal() == (
        "/data/cache: the cache needs 124.0 GB but the disk has 80.3 GB free; free space, use --downsample 2 "
        "(31.0 GB) or another --out"
    )
    tight = CacheEstimate(Path("/c"), 2, 10, 10, 31 * 10**9, 9 * 10**9, {4: 8 * 10**9})
    assert "use --downsample 4 (8.0 GB)" in str(tight.refusal())
    hopeless = CacheEstimate(Path("/c"), 8, 10, 10, 8 * 10**9, 10**6, {16: 2 * 10**9})
    assert str(hopeless.refusal()).endswith("free; free space or use another --out")
    margin = CacheEstimate(Path("/c"), 1, 10, 10, 10**9, 10**9 + 10**6, {})  # fits, but not with headroom
    assert "needs 1.0 GB and 87.2 MB of headroom but the disk has 1.0 GB free" in str(margin.refusal())
    assert CacheEstimate(Path("/c"), 1, 10, 10, 10**9, 2 * 10**9, {}).refusal() is None
    assert CacheEstimate(Path("/c"), 1, 10, 0, 10**6, 0, {}).refusal() is None  # nothing left to write
    assert [format_bytes(n) for n in (999, 1000, 2_345_678, 1.5e12)] == ["999 B", "1.0 kB", "2.3 MB", "1.5 TB"]


def test_prepare_cli_prints_the_estimate_and_refuses_a_full_disk(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The competition's layout (metadata.csv at the data root, bare ids), through the CLI; then a disk with
    1 kB free: one line with the figures, exit 2, nothing written."""
    from types import SimpleNamespace

    from data_root import data_root

    root = data_root(dataset, tmp_path / "root", ("train", "test"))
    out = tmp_path / "cache"
    assert main(["prepare", str(root / "train"), "--out", str(out), "--downsample", "4", "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prepare: 16 tiles, ") and f"at downsample 4 into {out} (" in lines[0]
    assert "verified 16 entries: all sound" in lines[-1]
    assert json.loads((out / "cache.json").read_text())["metadata"] == str(root / "metadata.csv")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1000))
    full = tmp_path / "full" / "cache"
    assert main(["prepare", str(root / "train"), "--out", str(full), "--workers", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("prepare: 16 tiles, ") and "(1.0 kB free)" in captured.out
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"geopose-ray prepare: error: {full}: the cache needs ")
    assert "but the disk has 1.0 kB free; free space or use another --out" in captured.err
    assert not full.exists() and not full.parent.exists()


def test_prepare_with_metadata_path_and_groups(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_root import data_root

    from geopose_ray.data.manifest import groups_checksum

    root = data_root(dataset, tmp_path / "root", ("train",))
    meta = tmp_path / "meta.csv"
    (root / "metadata.csv").rename(meta)
    out = tmp_path / "cache"
    argv = ["prepare", str(root / "train"), "--out", str(out), "--downsample", "4", "--folds", "3", "--workers", "1"]
    assert main(argv) == 2
    assert "no metadata.csv beside the tiles or at the data root" in capsys.readouterr().err
    assert not out.exists()
    stems = sorted(p.name[: -len("_AGL.tif")] for p in (root / "train").glob("*_AGL.tif"))
    groups = tmp_path / "dups.csv"
    groups.write_text("id,group\n" + "".join(f"{s.split('_')[1]},g\n" for s in stems[:5]))
    assert main([*argv, "--metadata", str(meta), "--groups", str(groups)]) == 0
    capsys.readouterr()
    info = json.loads((out / "cache.json").read_text())
    assert info["groups"] == {"file": "dups.csv", "sha256": groups_checksum(groups)}
    assert (info["folds"], info["seed"], info["metadata"]) == (3, 0, str(meta))
    rows = TrainingCache(out).rows
    assert len({r.fold for r in rows if r.stem in stems[:5]}) == 1
    # The cache keeps its folds: other groups, seed or fold count are refused, in one line.
    for extra in (["--seed", "1"], [], ["--groups", str(groups), "--folds", "4"]):
        assert main([*argv, "--metadata", str(meta), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out}: holds a cache built with --folds 3 --seed 0 --groups dups.csv" in err
        assert "rerun with the options it was built with, or use another --out" in err
    assert main([*argv, "--metadata", str(meta), "--groups", str(groups)]) == 0
    assert "0 entries written, 16 already complete" in capsys.readouterr().out


def test_a_cache_of_an_older_prepare_keeps_its_manifest_folds(cache: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    info = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({k: info[k] for k in ("format", "downsample", "source")}))
    with pytest.raises(DataError, match=r"its manifest.csv has \d+ tile\(s\) in other folds than --folds 4 --seed 1"):
        prepare_cache(dataset / "train", out, 2, folds=4, seed=1, workers=1)
    assert prepare_cache(dataset / "train", out, 2, folds=4, seed=0, workers=1).skipped == 16

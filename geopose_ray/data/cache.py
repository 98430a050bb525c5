"""The training cache: every tile decoded once, downsampled, stored as memory-mappable ``.npy`` arrays.

Layout of a cache directory::

    cache.json             format version, downsample factor, source directory
    manifest.csv           the manifest (folds included), written when every entry is done
    entries/{stem}.rgb.npy (H/K, W/K, 3) uint8, area-resampled
    entries/{stem}.agl.npy (H/K, W/K) uint16 centimetres, 65535 = no data, nearest-resampled
    entries/{stem}.json    the entry's labels and checksums; written last, so it marks the entry complete

Every file is written through a temporary file and an atomic rename, and an entry counts only once its
json exists, so an interrupted ``prepare`` never leaves a half-written entry that a reader could load.
Rerunning it skips complete entries and redoes the rest.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from geopose_ray.data.layout import CITIES
from geopose_ray.data.manifest import ManifestRow, build_manifest, read_manifest, write_manifest
from geopose_ray.data.rasters import agl_cm_to_m, read_agl_cm, read_rgb
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.fsutil import atomic_save_npy, atomic_write_text
from geopose_ray.parallel import pmap

CACHE_FORMAT = 1


def downsample_rgb(rgb: NDArray[np.uint8], k: int) -> NDArray[np.uint8]:
    """Area resampling by an integer factor: each output pixel is the mean of a k×k block, rounded."""
    if k == 1:
        return rgb
    h, w, c = rgb.shape
    blocks = rgb.reshape(h // k, k, w // k, k, c).astype(np.uint32).sum(axis=(1, 3))
    return ((blocks + (k * k) // 2) // (k * k)).astype(np.uint8)


def downsample_nearest(a: NDArray[np.generic], k: int) -> NDArray[np.generic]:
    """Nearest resampling by an integer factor, sampling each block's centre pixel (as GDAL does)."""
    return a if k == 1 else np.ascontiguousarray(a[k // 2 :: k, k // 2 :: k])


def _crc(a: NDArray[np.generic]) -> int:
    return zlib.crc32(np.ascontiguousarray(a).data)


@dataclass(frozen=True)
class _Job:
    source: Path
    entries: Path
    row: ManifestRow
    k: int


@dataclass(frozen=True)
class _Done:
    stem: str
    skipped: bool
    error: str | None = None


def _entry_paths(entries: Path, stem: str) -> tuple[Path, Path, Path]:
    return entries / f"{stem}.rgb.npy", entries / f"{stem}.agl.npy", entries / f"{stem}.json"


def check_entry(entries: Path, stem: str) -> str | None:
    """Why a cache entry is unusable (missing, unreadable, wrong shape or checksum), or None if it is sound."""
    rgb_p, agl_p, meta_p = _entry_paths(entries, stem)
    if not meta_p.exists():
        return f"{stem}: cache entry missing; run geopose-ray prepare to complete the cache"
    try:
        meta = json.loads(meta_p.read_text())
        rgb = np.load(rgb_p, mmap_mode="r")
        agl = np.load(agl_p, mmap_mode="r")
        h, w = meta["shape"]
        if rgb.shape != (h, w, 3) or rgb.dtype != np.uint8 or agl.shape != (h, w) or agl.dtype != np.uint16:
            return f"{stem}: cache entry has the wrong shape or dtype; rerun geopose-ray prepare to rebuild it"
        if _crc(rgb) != meta["rgb_crc32"] or _crc(agl) != meta["agl_crc32"]:
            return f"{stem}: cache entry checksum mismatch (corrupt); rerun geopose-ray prepare to rebuild it"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{stem}: cache entry unreadable ({e}); rerun geopose-ray prepare to rebuild it"
    return None


def _prepare_one(job: _Job) -> _Done:
    rgb_p, agl_p, meta_p = _entry_paths(job.entries, job.row.stem)
    if check_entry(job.entries, job.row.stem) is None:
        return _Done(job.row.stem, skipped=True)
    meta_p.unlink(missing_ok=True)  # a rebuilt entry is incomplete until its json is written again
    try:
        rgb = read_rgb(job.source / job.row.rgb)
        agl = read_agl_cm(job.source / job.row.agl)
    except DataError as e:
        return _Done(job.row.stem, skipped=False, error=str(e))
    if rgb.shape[:2] != agl.shape:
        return _Done(job.row.stem, False, f"{job.row.stem}: RGB is {rgb.shape[:2]} but AGL is {agl.shape}")
    if rgb.shape[0] % job.k or rgb.shape[1] % job.k:
        return _Done(
            job.row.stem,
            False,
            f"{job.row.stem}: size {rgb.shape[1]}x{rgb.shape[0]} is not divisible by {job.k}",
        )
    rgb_small = downsample_rgb(rgb, job.k)
    agl_small = downsample_nearest(agl, job.k)
    atomic_save_npy(rgb_p, rgb_small)
    atomic_save_npy(agl_p, agl_small)
    meta = {
        **asdict(job.row),
        "scale": job.row.scale / job.k,  # pixels per metre at the cached resolution
        "shape": list(agl_small.shape),
        "full_shape": list(agl.shape),
        "rgb_crc32": _crc(rgb_small),
        "agl_crc32": _crc(agl_small),
    }
    atomic_write_text(meta_p, json.dumps(meta))
    return _Done(job.row.stem, skipped=False)


@dataclass
class PrepareResult:
    """What ``prepare`` did."""

    cache: Path
    written: int
    skipped: int
    errors: list[str]


def prepare_cache(
    source: str | Path,
    out: str | Path,
    downsample: int = 2,
    folds: int = 5,
    seed: int = 0,
    workers: int | None = None,
) -> PrepareResult:
    """Build (or complete) the training cache of a labelled dataset directory.

    Tiles that cannot be decoded are reported in ``errors`` and left out; everything else is written. The
    manifest is written only when no tile failed, so a cache with a manifest is complete.
    """
    if downsample < 1:
        raise ConfigError(f"The value of `downsample` is {downsample}, but must be `downsample >= 1`")
    source, out = Path(source).resolve(), Path(out)
    entries = out / "entries"
    entries.mkdir(parents=True, exist_ok=True)
    for stale in entries.glob(".*.tmp-*"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)
    info_path = out / "cache.json"
    info = {"format": CACHE_FORMAT, "downsample": downsample, "source": str(source)}
    if info_path.exists():
        old = json.loads(info_path.read_text())
        if old.get("downsample") != downsample or old.get("format") != CACHE_FORMAT:
            raise DataError(
                f"{out}: holds a cache with downsample {old.get('downsample')} (format {old.get('format')}); "
                f"use another --out or delete it to build one with downsample {downsample}"
            )
    else:
        atomic_write_text(info_path, json.dumps(info))
    rows = build_manifest(source, folds, seed)
    jobs = [_Job(source, entries, r, downsample) for r in rows]
    done = list(pmap(_prepare_one, jobs, workers=workers, desc="prepare"))
    errors = [d.error for d in done if d.error]
    if not errors:
        write_manifest(out / "manifest.csv", rows)
    return PrepareResult(
        out, written=sum(not d.skipped and not d.error for d in done), skipped=sum(d.skipped for d in done),
        errors=errors,
    )  # fmt: skip


@dataclass
class Sample:
    """One cached training sample as numpy arrays (before any augmentation or tensor conversion)."""

    stem: str
    image: NDArray[np.uint8]  # (H, W, 3)
    agl: NDArray[np.float32]  # (H, W) metres, NaN = no data
    scale: float  # pixels per metre at the cached resolution
    angle: float  # radians
    gsd: float  # metres per pixel at full resolution
    city: int  # index into CITIES


class TrainingCache:
    """A read-only view of a prepared cache; arrays are memory-mapped, never decoded."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        info_path = self.path / "cache.json"
        if not info_path.exists():
            raise DataError(f"{self.path}: not a training cache (no cache.json); run geopose-ray prepare")
        self.info = json.loads(info_path.read_text())
        self.downsample = int(self.info["downsample"])
        self.rows = read_manifest(self.path / "manifest.csv")
        self._meta: dict[str, dict[str, object]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tile_size(self) -> int:
        """Side in pixels of the cached tiles (the training resolution)."""
        if not self.rows:
            raise DataError(f"{self.path}: the cache holds no tiles; run geopose-ray prepare")
        return int(self.meta(self.rows[0].stem)["shape"][0])  # type: ignore[index]

    def meta(self, stem: str) -> dict[str, object]:
        if stem not in self._meta:
            p = self.path / "entries" / f"{stem}.json"
            try:
                self._meta[stem] = json.loads(p.read_text())
            except FileNotFoundError as e:
                raise DataError(f"{p}: cache entry missing; rerun geopose-ray prepare to complete it") from e
        return self._meta[stem]

    def shape(self, stem: str) -> tuple[int, int]:
        """(rows, columns) of a cached tile."""
        h, w = self.meta(stem)["shape"]  # type: ignore[misc]
        return int(h), int(w)

    def load(self, stem: str, window: tuple[int, int, int, int] | None = None) -> Sample:
        """A cached tile, or the part of it in ``window`` = (row, column, rows, columns).

        The arrays are memory-mapped: only the pixels asked for are read from disk and converted, so a crop of a
        2048² tile costs a crop's worth of I/O and arithmetic, not a tile's. The image stays a read-only view.
        """
        rgb_p, agl_p, _ = _entry_paths(self.path / "entries", stem)
        meta = self.meta(stem)
        rgb = np.load(rgb_p, mmap_mode="r")
        agl_cm = np.load(agl_p, mmap_mode="r")
        if window is not None:
            r, c, h, w = window
            if r < 0 or c < 0 or h < 1 or w < 1 or r + h > agl_cm.shape[0] or c + w > agl_cm.shape[1]:
                raise DataError(f"{stem}: window {window} is outside the {agl_cm.shape[1]}x{agl_cm.shape[0]} tile")
            rgb = rgb[r : r + h, c : c + w]
            agl_cm = agl_cm[r : r + h, c : c + w]
        return Sample(
            stem=stem,
            image=rgb,
            agl=agl_cm_to_m(np.asarray(agl_cm)),
            scale=float(meta["scale"]),  # type: ignore[arg-type]
            angle=float(meta["angle"]),  # type: ignore[arg-type]
            gsd=float(meta["gsd"]),  # type: ignore[arg-type]
            city=CITIES.index(str(meta["city"])),
        )

    def verify(self) -> list[str]:
        """Check every entry: files present, shapes and dtypes as recorded, checksums match."""
        entries = self.path / "entries"
        return [p for p in (check_entry(entries, r.stem) for r in self.rows) if p is not None]

"""The training cache: every tile decoded once, downsampled, stored as memory-mappable ``.npy`` arrays.

Layout of a cache directory::

    cache.json             format version, downsample factor, source directory, metadata.csv, folds, seed and
                           the groups file (name and sha256) the folds were dealt with, or null
    manifest.csv           the manifest (folds included), written when every entry is done
    entries/{stem}.rgb.npy (H/K, W/K, 3) uint8, area-resampled
    entries/{stem}.agl.npy (H/K, W/K) uint16 centimetres, 65535 = no data, nearest-resampled
    entries/{stem}.json    the entry's labels, checksums, ``valid_px`` (valid AGL pixels at the cached resolution)
                           and ``agl_sum`` (their heights summed, metres); written last, so it marks the entry
                           complete. Entries of an older prepare lack the two sums (readers fall back to the
                           arrays); a rerun of prepare adds them.

Every file is written through a temporary file and an atomic rename, and an entry counts only once its
json exists, so an interrupted ``prepare`` never leaves a half-written entry that a reader could load.
Rerunning it skips complete entries and redoes the rest; it refuses folds other than the cache's own.

Before writing, ``prepare`` estimates the cache's size from the tiles' raster headers (:func:`estimate_cache`)
and refuses when the output's disk cannot hold it (:meth:`CacheEstimate.refusal`).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from geopose_ray.data.layout import CITIES, SHOWN, locate_metadata
from geopose_ray.data.manifest import (
    ManifestRow,
    build_manifest,
    groups_checksum,
    manifest_text,
    read_manifest,
    write_manifest,
)
from geopose_ray.data.rasters import agl_cm_to_m, raster_info, read_agl_cm, read_rgb
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.fsutil import atomic_save_npy, atomic_write_text
from geopose_ray.parallel import pmap

CACHE_FORMAT = 1
# Headroom the disk must have beyond the estimate: a share of it, a partial filesystem block per file, and a fixed
# amount for the temporary files of the atomic writes and whatever else writes to the disk meanwhile.
DISK_MARGIN_SHARE = 0.02
DISK_BLOCK = 4096
DISK_HEADROOM = 64 * 2**20


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


def agl_stats(agl_cm: NDArray[np.uint16]) -> tuple[int, float]:
    """(valid pixels, Σ of their heights in metres) of a uint16 centimetre tile, summed in float64 over the float32
    metres readers see (:func:`~geopose_ray.data.rasters.agl_cm_to_m`), so the sum equals theirs."""
    metres = agl_cm_to_m(np.asarray(agl_cm))
    valid = np.isfinite(metres)
    return int(valid.sum()), float(metres[valid].sum(dtype=np.float64))


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


def _entry_meta(
    row: ManifestRow,
    k: int,
    shape: Sequence[int],
    full_shape: Sequence[int],
    crcs: tuple[int, int],
    valid_px: int,
    agl_sum: float,
) -> dict[str, Any]:
    """An entry's json: its manifest row (scale at the cached resolution), shapes, checksums and AGL sums."""
    return {
        **asdict(row),
        "scale": row.scale / k,  # pixels per metre at the cached resolution
        "shape": list(shape),
        "full_shape": list(full_shape),
        "rgb_crc32": crcs[0],
        "agl_crc32": crcs[1],
        "valid_px": valid_px,  # valid AGL pixels at the cached resolution
        "agl_sum": agl_sum,  # Σ of their heights, metres
    }


def _add_stats(agl_p: Path, meta_p: Path) -> None:
    """Give a sound entry of an older prepare its ``valid_px`` and ``agl_sum`` (the json rewritten atomically)."""
    meta = json.loads(meta_p.read_text())
    if "valid_px" in meta and "agl_sum" in meta:
        return
    meta["valid_px"], meta["agl_sum"] = agl_stats(np.load(agl_p, mmap_mode="r"))
    atomic_write_text(meta_p, json.dumps(meta))


def _prepare_one(job: _Job) -> _Done:
    rgb_p, agl_p, meta_p = _entry_paths(job.entries, job.row.stem)
    if check_entry(job.entries, job.row.stem) is None:
        _add_stats(agl_p, meta_p)
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
    valid_px, agl_sum = agl_stats(np.asarray(agl_small, dtype=np.uint16))
    meta = _entry_meta(
        job.row, job.k, agl_small.shape, agl.shape, (_crc(rgb_small), _crc(agl_small)), valid_px, agl_sum
    )
    atomic_write_text(meta_p, json.dumps(meta))
    return _Done(job.row.stem, skipped=False)


# -- the size of a cache -------------------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """A size in decimal units with one decimal: ``124.0 GB``, ``3.2 MB``; bytes below 1 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _npy_bytes(shape: tuple[int, ...], dtype: type[np.generic]) -> int:
    """The size of the ``.npy`` file ``np.save`` writes for an array of ``shape`` and ``dtype``: header + data."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.tell() + math.prod(shape) * np.dtype(dtype).itemsize


def entry_bytes(row: ManifestRow, height: int, width: int, k: int) -> int:
    """Bytes of one cache entry of a ``height`` × ``width`` tile at downsample ``k``: the RGB (3 bytes a pixel) and
    AGL (2 bytes a pixel) arrays at 1/k² of the pixels with their npy headers, and the json (checksums and sums
    taken as long as they can be)."""
    h, w = height // k, width // k
    meta = _entry_meta(row, k, (h, w), (height, width), (2**32 - 1, 2**32 - 1), h * w, h * w * 100.0 + 0.123456789)
    return _npy_bytes((h, w, 3), np.uint8) + _npy_bytes((h, w), np.uint16) + len(json.dumps(meta).encode())


def _tile_shape(path: Path) -> tuple[int, int] | None:
    """(height, width) from a raster's header (nothing decoded), or None when it cannot be read (prepare reports
    that tile itself)."""
    try:
        info = raster_info(path)
    except DataError:
        return None
    return info.height, info.width


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk of ``path``, or of its nearest existing parent when it does not exist yet."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


@dataclass(frozen=True)
class CacheEstimate:
    """What a prepare is about to write, and where."""

    out: Path
    downsample: int
    tiles: int  # tiles of the dataset
    to_write: int  # of them, those without a complete entry yet
    bytes: int  # what they take at ``downsample``, with the manifest and cache.json
    free: int  # free bytes on the disk of ``out``
    options: dict[int, int]  # larger downsample factors that divide every tile → bytes at that factor

    def margin(self, nbytes: int | None = None) -> int:
        """Headroom required beyond ``nbytes`` (default this estimate's): :data:`DISK_MARGIN_SHARE` of it, a
        partial block per file written, and :data:`DISK_HEADROOM`."""
        nbytes = self.bytes if nbytes is None else nbytes
        return int(DISK_MARGIN_SHARE * nbytes) + 3 * DISK_BLOCK * self.to_write + DISK_HEADROOM

    def describe(self) -> str:
        """``3,000 tiles, 124.0 GB at downsample 1 into <out> (96.2 GB free)``."""
        todo = "" if self.to_write == self.tiles else f" ({self.to_write:,} to write)"
        return (
            f"{self.tiles:,} tiles{todo}, {format_bytes(self.bytes)} at downsample {self.downsample} into {self.out} "
            f"({format_bytes(self.free)} free)"
        )

    def refusal(self) -> str | None:
        """Why the disk cannot hold the cache, with what to do (a larger downsample that fits, if any), or None."""
        if self.to_write == 0 or self.bytes + self.margin() <= self.free:
            return None
        need = format_bytes(self.bytes)
        if self.bytes <= self.free:
            need += f" and {format_bytes(self.margin())} of headroom"
        fits = [k for k, n in sorted(self.options.items()) if n + self.margin(n) <= self.free]
        todo = (
            f"free space, use --downsample {fits[0]} ({format_bytes(self.options[fits[0]])}) or another --out"
            if fits
            else "free space or use another --out"
        )
        return f"{self.out}: the cache needs {need} but the disk has {format_bytes(self.free)} free; {todo}"


def estimate_cache(
    rows: Sequence[ManifestRow], source: Path, out: Path, downsample: int, workers: int | None = None
) -> CacheEstimate:
    """The size of the entries of ``rows`` that ``out`` does not hold complete yet (their json is missing), from the
    tiles' raster headers (AGL, read in parallel, nothing decoded), plus the manifest and cache.json; and the free
    space of ``out``'s disk. A tile whose header cannot be read counts at the most common size."""
    entries = out / "entries"
    todo = [r for r in rows if not (entries / f"{r.stem}.json").exists()]
    found = list(pmap(_tile_shape, [source / r.agl for r in todo], workers=workers, desc="estimate"))
    common = Counter(s for s in found if s is not None).most_common(1)
    fallback = common[0][0] if common else (0, 0)
    shapes = [s if s is not None else fallback for s in found]
    extra = len(manifest_text(rows).encode()) + 1024  # the manifest, and cache.json
    dims = [d for s in shapes for d in s if d]
    g = math.gcd(*dims) if dims else 0

    def at(k: int) -> int:
        return sum(entry_bytes(r, h, w, k) for r, (h, w) in zip(todo, shapes, strict=True)) + extra

    options = {k: at(k) for k in range(downsample + 1, 17) if g and g % k == 0}
    return CacheEstimate(out, downsample, len(rows), len(todo), at(downsample), free_bytes(out), options)


# -- prepare -------------------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    """What ``prepare`` did."""

    cache: Path
    written: int
    skipped: int
    errors: list[str]
    estimate: CacheEstimate | None = None


def _folds_text(folds: object, seed: object, groups: object) -> str:
    g = f" --groups {groups['file']}" if isinstance(groups, dict) else ""
    return f"--folds {folds} --seed {seed}{g}"


def _check_folds(out: Path, old: dict[str, Any], info: dict[str, Any], rows: Sequence[ManifestRow]) -> None:
    """Refuse folds other than those an existing cache was built with: recorded in its cache.json (folds, seed,
    groups checksum), or, for a cache of an older prepare, in its manifest.

    Raises:
        DataError: naming the cache, the options it was built with and the fix.
    """
    wanted = _folds_text(info["folds"], info["seed"], info["groups"])
    fix = "rerun with the options it was built with, or use another --out (or delete it) for new folds"
    if "folds" in old and "seed" in old:
        old_sum = (old.get("groups") or {}).get("sha256")
        new_sum = (info["groups"] or {}).get("sha256")
        if (old["folds"], old["seed"], old_sum) != (info["folds"], info["seed"], new_sum):
            built = _folds_text(old["folds"], old["seed"], old.get("groups"))
            raise DataError(f"{out}: holds a cache built with {built}, not {wanted}; {fix}")
    manifest = out / "manifest.csv"
    if manifest.exists():
        before = {r.stem: r.fold for r in read_manifest(manifest)}
        moved = [r.stem for r in rows if r.stem in before and before[r.stem] != r.fold]
        if moved:
            shown = ", ".join(moved[:SHOWN]) + (", ..." if len(moved) > SHOWN else "")
            raise DataError(
                f"{out}: its manifest.csv has {len(moved)} tile(s) in other folds than {wanted} deals ({shown}); {fix}"
            )


def prepare_cache(
    source: str | Path,
    out: str | Path,
    downsample: int = 2,
    folds: int = 5,
    seed: int = 0,
    workers: int | None = None,
    *,
    metadata: str | Path | None = None,
    groups: str | Path | None = None,
    on_estimate: Callable[[CacheEstimate], None] | None = None,
) -> PrepareResult:
    """Build (or complete) the training cache of a labelled dataset directory.

    Args:
        metadata: the metadata.csv (``--metadata``); default the one beside the tiles, else at the data root.
        groups: a groups file (``--groups``, columns ``id,group``): tiles of one group share a fold.
        on_estimate: called with the size estimate before anything is written (the CLI prints it).

    Tiles that cannot be decoded are reported in ``errors`` and left out; everything else is written. The
    manifest is written only when no tile failed, so a cache with a manifest is complete.

    Raises:
        DataError: a cache of another downsample or other folds at ``out``, a dataset problem, or a disk that
            cannot hold the cache (before anything is written).
    """
    if downsample < 1:
        raise ConfigError(f"The value of `downsample` is {downsample}, but must be `downsample >= 1`")
    source, out = Path(source).resolve(), Path(out)
    meta_path = locate_metadata(source, metadata)
    grouping = {"file": Path(groups).name, "sha256": groups_checksum(groups)} if groups is not None else None
    info = {
        "format": CACHE_FORMAT, "downsample": downsample, "source": str(source),
        "metadata": str(meta_path.resolve()) if meta_path is not None else None,
        "folds": folds, "seed": seed, "groups": grouping,
    }  # fmt: skip
    info_path = out / "cache.json"
    old: dict[str, Any] | None = None
    if info_path.exists():
        old = json.loads(info_path.read_text())
        if old.get("downsample") != downsample or old.get("format") != CACHE_FORMAT:
            raise DataError(
                f"{out}: holds a cache with downsample {old.get('downsample')} (format {old.get('format')}); "
                f"use another --out or delete it to build one with downsample {downsample}"
            )
    rows = build_manifest(source, folds, seed, meta_path, groups)
    if old is not None:
        _check_folds(out, old, info, rows)
    estimate = estimate_cache(rows, source, out, downsample, workers)
    if on_estimate is not None:
        on_estimate(estimate)
    refused = estimate.refusal()
    if refused:
        raise DataError(refused)
    entries = out / "entries"
    entries.mkdir(parents=True, exist_ok=True)
    for stale in entries.glob(".*.tmp-*"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)
    if old != info:
        atomic_write_text(info_path, json.dumps(info))
    jobs = [_Job(source, entries, r, downsample) for r in rows]
    done = list(pmap(_prepare_one, jobs, workers=workers, desc="prepare"))
    errors = [d.error for d in done if d.error]
    if not errors:
        write_manifest(out / "manifest.csv", rows)
    return PrepareResult(
        out, written=sum(not d.skipped and not d.error for d in done), skipped=sum(d.skipped for d in done),
        errors=errors, estimate=estimate,
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
        shape: list[int] = self.meta(stem)["shape"]  # type: ignore[assignment]
        return int(shape[0]), int(shape[1])

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

"""The manifest of a dataset: one row per labelled tile, and city-stratified K folds."""

from __future__ import annotations

import csv
import io
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from geopose_ray.data.layout import (
    METADATA_FILE,
    city_of,
    lookup_metadata,
    read_metadata,
    read_vflow,
    scan_dir,
)
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.fsutil import atomic_write_text


@dataclass(frozen=True)
class ManifestRow:
    """One labelled tile. Paths are relative to the dataset directory."""

    stem: str
    city: str
    gsd: float  # metres per pixel
    scale: float  # flow pixels per metre of height, at the tile's stored resolution
    angle: float  # radians in [0, 2π)
    fold: int
    rgb: str
    agl: str
    vflow: str


def assign_folds(stems: Sequence[str], k: int = 5, seed: int = 0) -> dict[str, int]:
    """City-stratified folds: each city's tiles are shuffled (seeded) and dealt round-robin.

    Every city with at least ``k`` tiles is in every fold; fold sizes differ by at most one per city, and the
    dealing continues across cities so overall fold sizes stay balanced too. Deterministic for a seed and
    independent of the order of ``stems``.
    """
    if k < 2:
        raise ConfigError(f"The value of `folds` is {k}, but must be `folds >= 2`")
    by_city: dict[str, list[str]] = {}
    for stem in sorted(set(stems)):
        by_city.setdefault(city_of(stem), []).append(stem)
    folds: dict[str, int] = {}
    start = 0
    for city in sorted(by_city):
        members = by_city[city]
        # A per-city stream keyed by a stable hash, so adding a city never reshuffles another.
        rng = np.random.default_rng([seed, zlib.crc32(city.encode())])
        for i, j in enumerate(rng.permutation(len(members))):
            folds[members[j]] = (start + i) % k
        start = (start + len(members)) % k
    return folds


def build_manifest(directory: str | Path, k: int = 5, seed: int = 0) -> list[ManifestRow]:
    """Manifest of a labelled dataset directory (reads only metadata and json, decodes no image).

    Raises :class:`DataError` for a tile without its partner files or metadata; run ``geopose-ray validate``
    first for a full report.
    """
    directory = Path(directory)
    meta = read_metadata(directory / METADATA_FILE)
    tiles = scan_dir(directory)
    if not tiles:
        raise DataError(f"{directory}: no challenge files found (expected *_RGB.j2k, *_AGL.tif, *_VFLOW.json)")
    folds = assign_folds(list(tiles), k, seed)
    rows = []
    for stem, files in sorted(tiles.items()):
        if not files.rgb or files.agl is None or files.vflow is None:
            raise DataError(f"{directory}/{stem}: RGB, AGL and VFLOW are not all present; run geopose-ray validate")
        m = lookup_metadata(meta, stem)
        if m is None:
            raise DataError(f"{directory / METADATA_FILE}: no row for {stem}; add it (id, city, gsd)")
        scale, angle = read_vflow(files.vflow)
        rows.append(
            ManifestRow(
                stem=stem,
                city=city_of(stem),
                gsd=m.gsd,
                scale=scale,
                angle=angle,
                fold=folds[stem],
                rgb=files.rgb[0].name,
                agl=files.agl.name,
                vflow=files.vflow.name,
            )
        )
    return rows


def refold(rows: Iterable[ManifestRow], k: int, seed: int) -> list[ManifestRow]:
    """The same rows with folds reassigned."""
    rows = list(rows)
    folds = assign_folds([r.stem for r in rows], k, seed)
    return [replace(r, fold=folds[r.stem]) for r in rows]


_FIELDS = [f.name for f in fields(ManifestRow)]


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = asdict(r)
        d["gsd"], d["scale"], d["angle"] = repr(r.gsd), repr(r.scale), repr(r.angle)
        writer.writerow(d)
    atomic_write_text(path, buf.getvalue())


def read_manifest(path: str | Path) -> list[ManifestRow]:
    path = Path(path)
    try:
        with open(path, newline="") as f:
            return [
                ManifestRow(
                    stem=r["stem"],
                    city=r["city"],
                    gsd=float(r["gsd"]),
                    scale=float(r["scale"]),
                    angle=float(r["angle"]),
                    fold=int(r["fold"]),
                    rgb=r["rgb"],
                    agl=r["agl"],
                    vflow=r["vflow"],
                )
                for r in csv.DictReader(f)
            ]
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; run geopose-ray prepare to build it") from e
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: malformed manifest ({e}); delete it and rerun geopose-ray prepare") from e

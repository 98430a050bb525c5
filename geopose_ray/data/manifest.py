"""The manifest of a dataset: one row per labelled tile, and city-stratified K folds, optionally by group.

A groups file (``prepare --groups FILE``) is a CSV with columns ``id,group``: ``id`` a full stem (``JAX_ABCDEF``)
or a bare id (``ABCDEF``), ``group`` any label. Tiles of one group (near-duplicates of one place) always land in
the same fold; tiles the file does not list are groups of their own; rows naming no tile of the dataset (test
tiles, say) are ignored.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from geopose_ray.data.layout import (
    SHOWN,
    bare_id,
    city_of,
    locate_metadata,
    lookup_metadata,
    no_metadata_error,
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


def assign_folds(
    stems: Sequence[str], k: int = 5, seed: int = 0, groups: Mapping[str, str] | None = None
) -> dict[str, int]:
    """City-stratified folds: each city's tiles are shuffled (seeded) and dealt round-robin.

    Every city with at least ``k`` tiles is in every fold; fold sizes differ by at most one per city, and the
    dealing continues across cities so overall fold sizes stay balanced too. Deterministic for a seed and
    independent of the order of ``stems``.

    With ``groups`` (stem → group label, e.g. from :func:`resolve_groups`), whole groups are dealt instead, so a
    group is never split across folds: see :func:`_deal_groups`. Stems not in ``groups`` are groups of their own.
    Without groups (None or empty) the folds are exactly the round-robin ones above.
    """
    if k < 2:
        raise ConfigError(f"The value of `folds` is {k}, but must be `folds >= 2`")
    if groups:
        return _deal_groups(stems, k, seed, groups)
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


def _deal_groups(stems: Sequence[str], k: int, seed: int, groups: Mapping[str, str]) -> dict[str, int]:
    """Group folds: whole groups dealt, city by city, largest first, each to the fold that holds the fewest tiles
    of that city so far; ties go to the fold with the fewest tiles overall, then to a seeded order of the folds.

    A group belongs to the city most of its tiles are in (ties: the first city by name); the order of equally
    large groups is a seeded shuffle. Everything is drawn from the city's own stream, keyed like the round-robin
    dealing's, and built from sorted stems and labels, so the folds depend on the seed, the tiles and the groups,
    never on the order they are given in. Within a city, fold sizes differ by at most the largest group's size
    (by one when every group is a single tile).
    """
    units: dict[tuple[int, str], list[str]] = {}
    for stem in sorted(set(stems)):
        label = groups.get(stem)
        key = (0, label) if label is not None else (1, stem)  # a listed group, or a tile of its own
        units.setdefault(key, []).append(stem)
    by_city: dict[str, list[list[str]]] = {}
    for members in sorted(units.values()):
        cities = Counter(city_of(s) for s in members)
        home = min(cities, key=lambda c: (-cities[c], c))
        by_city.setdefault(home, []).append(members)
    folds: dict[str, int] = {}
    total = [0] * k
    for city in sorted(by_city):
        rng = np.random.default_rng([seed, zlib.crc32(city.encode())])
        shuffled = [by_city[city][j] for j in rng.permutation(len(by_city[city]))]
        rank = rng.permutation(k)
        here = [0] * k
        for members in sorted(shuffled, key=len, reverse=True):  # stable: equal sizes keep the seeded order
            f = min(range(k), key=lambda i: (here[i], total[i], rank[i]))
            for s in members:
                folds[s] = f
            here[f] += len(members)
            total[f] += len(members)
    return folds


def read_groups(path: str | Path) -> dict[str, str]:
    """Read a groups file (CSV with columns ``id,group``) as id → group label.

    Raises:
        DataError: naming the file: missing, without the two columns, an empty cell, or an id given two groups.
    """
    path = Path(path)
    out: dict[str, str] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"id", "group"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: missing column(s) {sorted(missing)}; a groups file has columns id,group")
            for line, rec in enumerate(reader, start=2):
                key, label = (rec.get("id") or "").strip(), (rec.get("group") or "").strip()
                if not key or not label:
                    raise DataError(f"{path}: line {line} has an empty id or group; give both or delete the line")
                if out.setdefault(key, label) != label:
                    raise DataError(
                        f"{path}: id {key} is in group {out[key]!r} and, on line {line}, in {label!r}; keep one"
                    )
    except FileNotFoundError as e:
        raise DataError(f"{path}: --groups file not found; pass a CSV with columns id,group") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text CSV ({e}); pass a CSV with columns id,group") from e
    return out


def groups_checksum(path: str | Path) -> str:
    """The sha256 of a groups file's bytes, recorded in the cache to tell which grouping built its folds."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_groups(groups: Mapping[str, str], stems: Iterable[str], source: str | Path) -> dict[str, str]:
    """Stem → group label for the ``stems`` a groups file (read as ``groups``, named ``source`` in errors) lists,
    by full stem or bare id. Ids naming none of the stems are ignored; a file naming none at all is refused.

    Raises:
        DataError: no id of the file names a tile, or a tile listed under two groups (as stem and as bare id).
    """
    out: dict[str, str] = {}
    for stem in stems:
        by_stem, by_id = groups.get(stem), groups.get(bare_id(stem))
        if by_stem is not None and by_id is not None and by_stem != by_id:
            raise DataError(
                f"{source}: {stem} is in group {by_stem!r} as {stem} and in {by_id!r} as {bare_id(stem)}; keep one"
            )
        label = by_stem if by_stem is not None else by_id
        if label is not None:
            out[stem] = label
    if groups and not out:
        raise DataError(
            f"{source}: none of its {len(groups)} id(s) names a tile here; ids are stems (JAX_ABCDEF) or bare ids "
            "(ABCDEF) of this dataset's tiles"
        )
    return out


def build_manifest(
    directory: str | Path,
    k: int = 5,
    seed: int = 0,
    metadata: str | Path | None = None,
    groups: str | Path | None = None,
) -> list[ManifestRow]:
    """Manifest of a labelled dataset directory (reads only metadata and json, decodes no image).

    Args:
        metadata: the metadata.csv to read (``--metadata``); default the one beside the tiles, else the one at
            the data root above them (:func:`~geopose_ray.data.layout.locate_metadata`).
        groups: a groups file (``--groups``): tiles of one group share a fold (:func:`assign_folds`).

    Raises :class:`DataError` for a tile without its partner files or metadata; run ``geopose-ray validate``
    first for a full report.
    """
    directory = Path(directory)
    tiles = scan_dir(directory)
    if not tiles:
        raise DataError(f"{directory}: no challenge files found (expected *_RGB.j2k, *_AGL.tif, *_VFLOW.json)")
    meta_path = locate_metadata(directory, metadata)
    if meta_path is None:
        raise no_metadata_error(directory)
    meta = read_metadata(meta_path)
    unknown = [s for s in sorted(tiles) if lookup_metadata(meta, s) is None]
    if unknown:
        shown = ", ".join(unknown[:SHOWN]) + (", ..." if len(unknown) > SHOWN else "")
        raise DataError(
            f"{meta_path}: no row for {len(unknown)} tile(s) of {directory} ({shown}); add them (id, city, gsd) "
            "or pass --metadata PATH"
        )
    by_stem = resolve_groups(read_groups(groups), tiles, groups) if groups is not None else None
    folds = assign_folds(list(tiles), k, seed, by_stem)
    rows = []
    for stem, files in sorted(tiles.items()):
        m = lookup_metadata(meta, stem)
        if not files.rgb or files.agl is None or files.vflow is None or m is None:
            raise DataError(f"{directory}/{stem}: RGB, AGL and VFLOW are not all present; run geopose-ray validate")
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


def refold(
    rows: Iterable[ManifestRow], k: int, seed: int, groups: Mapping[str, str] | None = None
) -> list[ManifestRow]:
    """The same rows with folds reassigned (``groups``: stem → group label, as :func:`assign_folds` takes)."""
    rows = list(rows)
    folds = assign_folds([r.stem for r in rows], k, seed, groups)
    return [replace(r, fold=folds[r.stem]) for r in rows]


_FIELDS = [f.name for f in fields(ManifestRow)]


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> None:
    atomic_write_text(path, manifest_text(rows))


def manifest_text(rows: Iterable[ManifestRow]) -> str:
    """The manifest.csv of ``rows``, as :func:`write_manifest` writes it."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = asdict(r)
        d["gsd"], d["scale"], d["angle"] = repr(r.gsd), repr(r.scale), repr(r.angle)
        writer.writerow(d)
    return buf.getvalue()


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

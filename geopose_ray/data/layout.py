"""The challenge's file layout: file names, ``_VFLOW.json`` and ``metadata.csv``. No raster I/O here.

One sample is ``{CITY}_{ID}_RGB.j2k`` (or ``.tif``), ``{CITY}_{ID}_AGL.tif`` and ``{CITY}_{ID}_VFLOW.json``;
``metadata.csv`` has at least ``id``, ``city`` and ``gsd`` (metres per pixel). The json stores the scale in
pixels per centimetre; inside the project it is pixels per metre.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_text

CITIES: tuple[str, ...] = ("ARG", "ATL", "JAX", "OMA")
RGB_SUFFIXES: tuple[str, ...] = ("_RGB.j2k", "_RGB.tif")
AGL_SUFFIX = "_AGL.tif"
VFLOW_SUFFIX = "_VFLOW.json"
METADATA_FILE = "metadata.csv"
SHOWN = 5  # stems named in a one-line error about many tiles
STEM_RE = re.compile(r"^(?P<city>[A-Za-z]+)_(?P<id>[A-Za-z0-9]+)$")
FILE_RE = re.compile(r"^(?P<stem>.+?)(?P<suffix>_RGB\.j2k|_RGB\.tif|_AGL\.tif|_VFLOW\.json)$")


def city_of(stem: str) -> str:
    """The city prefix of a stem such as ``JAX_ABCDEF``; raises :class:`DataError` if it is not a known city."""
    m = STEM_RE.match(stem)
    if not m or m["city"] not in CITIES:
        raise DataError(f"{stem}: unknown city prefix; stems look like CITY_ID with CITY one of {list(CITIES)}")
    return m["city"]


@dataclass
class StemFiles:
    """The files found for one stem; ``rgb`` may list two when both .j2k and .tif exist (a duplicate)."""

    stem: str
    rgb: list[Path]
    agl: Path | None = None
    vflow: Path | None = None


def scan_dir(directory: str | Path) -> dict[str, StemFiles]:
    """Group a directory's challenge files by stem (files with other names are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory; pass the folder that holds the *_RGB/_AGL/_VFLOW files")
    found: dict[str, StemFiles] = {}
    for path in sorted(directory.iterdir()):
        m = FILE_RE.match(path.name)
        if not m or not path.is_file():
            continue
        entry = found.setdefault(m["stem"], StemFiles(m["stem"], []))
        if m["suffix"].startswith("_RGB"):
            entry.rgb.append(path)
        elif m["suffix"] == AGL_SUFFIX:
            entry.agl = path
        else:
            entry.vflow = path
    return found


def rgb_path(directory: str | Path, stem: str) -> Path:
    """The RGB file of a stem: ``.j2k`` if present, else ``.tif``."""
    directory = Path(directory)
    for suffix in RGB_SUFFIXES:
        p = directory / f"{stem}{suffix}"
        if p.exists():
            return p
    raise DataError(f"{directory}: no {stem}_RGB.j2k or {stem}_RGB.tif; check the dataset directory")


def agl_path(directory: str | Path, stem: str) -> Path:
    return Path(directory) / f"{stem}{AGL_SUFFIX}"


def vflow_path(directory: str | Path, stem: str) -> Path:
    return Path(directory) / f"{stem}{VFLOW_SUFFIX}"


def read_vflow(path: str | Path) -> tuple[float, float]:
    """Read ``(scale, angle)``: scale in pixels per metre (the file holds px/cm), angle in radians.

    Raises :class:`DataError` naming the file for a missing file, bad JSON, missing keys or non-numbers.
    Finiteness and the angle range are the validator's to judge, so they are returned as read.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; every labelled tile needs its _VFLOW.json") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: not valid JSON ({e}); rewrite it as {{"scale": ..., "angle": ...}}') from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with keys scale and angle")
    missing = [k for k in ("scale", "angle") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; the file needs scale (px/cm) and angle (radians)")
    values = []
    for key in ("scale", "angle"):
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise DataError(f"{path}: {key} is {v!r}, not a number")
        values.append(float(v))
    return values[0] * 100.0, values[1]


def write_vflow(path: str | Path, scale_px_per_m: float, angle: float) -> None:
    """Write a ``_VFLOW.json``: scale converted to pixels per centimetre, angle in radians."""
    # json writes NaN as the (non-standard) token NaN, which Python's json reads back; keep it, since a NaN
    # prediction must reach the scorer as NaN rather than fail to be written.
    atomic_write_text(path, json.dumps({"scale": scale_px_per_m / 100.0, "angle": angle}))


@dataclass(frozen=True)
class MetadataRow:
    """One ``metadata.csv`` row."""

    id: str
    city: str
    gsd: float  # metres per pixel


def read_metadata(path: str | Path) -> dict[str, MetadataRow]:
    """Read ``metadata.csv`` keyed by ``id``. Raises :class:`DataError` on a missing file or missing columns.

    Values are parsed but not judged (a non-positive gsd is the validator's to report); unparsable gsd is NaN.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            missing = {"id", "city", "gsd"} - fields
            if missing:
                raise DataError(f"{path}: missing column(s) {sorted(missing)}; it needs id, city and gsd")
            rows: dict[str, MetadataRow] = {}
            for rec in reader:
                try:
                    gsd = float(rec["gsd"])
                except (TypeError, ValueError):
                    gsd = math.nan
                rows.setdefault(rec["id"], MetadataRow(rec["id"], rec["city"], gsd))
            return rows
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; the dataset needs a metadata.csv with id, city and gsd") from e


def locate_metadata(directory: str | Path, explicit: str | Path | None = None) -> Path | None:
    """The ``metadata.csv`` that describes the tiles of ``directory``.

    ``explicit`` (``--metadata PATH``) wins and must exist. Otherwise the file beside the tiles, else the one at
    the data root above them: the competition ships a single ``metadata.csv`` there, keyed by bare id and
    covering train and test. None when there is neither.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise DataError(f"{path}: --metadata file not found; pass the metadata.csv with id, city and gsd")
        return path
    directory = Path(directory)
    for candidate in (directory / METADATA_FILE, directory.resolve().parent / METADATA_FILE):
        if candidate.is_file():
            return candidate
    return None


def metadata_duplicates(path: str | Path, stems: Iterable[str] | None = None) -> list[str]:
    """Ids that appear more than once in ``metadata.csv``; with ``stems``, only the ids of those tiles (a full
    stem or its bare id), so that a file covering train and test is judged only on the tiles at hand."""
    wanted = None if stems is None else {key for s in stems for key in (s, bare_id(s))}
    seen: set[str] = set()
    dups: list[str] = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            key = rec.get("id", "")
            if key in seen and (wanted is None or key in wanted):
                dups.append(key)
            seen.add(key)
    return dups


def bare_id(stem: str) -> str:
    """The ID part of a stem (``JAX_ABCDEF`` → ``ABCDEF``), as the competition's metadata.csv keys its rows."""
    return stem.split("_", 1)[-1]


def lookup_metadata(meta: dict[str, MetadataRow], stem: str) -> MetadataRow | None:
    """The metadata row of a stem, whether ``id`` holds the full stem or only its ID part."""
    return meta.get(stem) or meta.get(bare_id(stem))


def no_metadata_error(directory: str | Path) -> DataError:
    """The error for a tile folder with no ``metadata.csv`` beside it or at the data root above it."""
    directory = Path(directory)
    return DataError(
        f"{directory}: no {METADATA_FILE} beside the tiles or at the data root {directory.resolve().parent}; "
        "put the competition's metadata.csv (id, city, gsd) there or pass --metadata PATH"
    )


def missing_gsd(meta: dict[str, MetadataRow], stems: Iterable[str]) -> list[str]:
    """The stems, in order, whose metadata row is missing or whose gsd is not a finite number > 0."""
    bad = []
    for stem in stems:
        row = lookup_metadata(meta, stem)
        if row is None or not (math.isfinite(row.gsd) and row.gsd > 0):
            bad.append(stem)
    return bad


def require_gsd(
    meta_path: Path | None, meta: dict[str, MetadataRow], stems: Sequence[str], directory: str | Path, who: str
) -> None:
    """Refuse, in one line, when any of ``stems`` lacks a finite positive gsd that ``who`` (e.g. "this model")
    needs: the count and the first few stems, the file and what to do.

    Raises:
        DataError: naming ``meta_path`` (or ``directory`` when there is no metadata.csv at all).
    """
    if meta_path is None:
        raise DataError(f"{no_metadata_error(directory)} ({who} needs each tile's gsd)")
    bad = missing_gsd(meta, stems)
    if bad:
        shown = ", ".join(bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
        raise DataError(
            f"{meta_path}: {len(bad)} of {len(stems)} tile(s) of {directory} have no finite gsd > 0 ({shown}), "
            f"and {who} needs it; add their rows (id, city, gsd) or pass --metadata PATH"
        )


def write_metadata(path: str | Path, rows: Iterable[MetadataRow]) -> None:
    lines = ["id,city,gsd"] + [f"{r.id},{r.city},{r.gsd!r}" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")

"""``geopose-ray validate``: check every file of a dataset directory and report each problem with its fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from geopose_ray.data.layout import (
    CITIES,
    METADATA_FILE,
    StemFiles,
    city_of,
    locate_metadata,
    lookup_metadata,
    metadata_duplicates,
    read_metadata,
    read_vflow,
    scan_dir,
)
from geopose_ray.data.rasters import RasterInfo, raster_info
from geopose_ray.errors import DataError
from geopose_ray.geometry import TWO_PI
from geopose_ray.parallel import pmap

SPLITS = ("auto", "train", "test", "truth")


@dataclass(frozen=True)
class Problem:
    """One problem: the file, what is wrong with it, and what to do."""

    path: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}; {self.fix}"


@dataclass
class Report:
    """The outcome of a validation."""

    directory: Path
    split: str  # train (RGB+AGL+VFLOW), test (RGB only) or truth (AGL+VFLOW only)
    stems: int
    problems: list[Problem]
    metadata: Path | None = None  # the metadata.csv the tiles were checked against, None without one

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.directory}: {self.stems} {self.split} tiles, all files valid"
        return (
            f"{self.directory}: {self.stems} {self.split} tiles, {len(self.problems)} problem(s) "
            f"in {len({p.path for p in self.problems})} file(s)"
        )


def detect_split(tiles: dict[str, StemFiles]) -> str:
    """``train`` if labels and images are present, ``test`` with images only, ``truth`` with labels only."""
    has_rgb = any(t.rgb for t in tiles.values())
    has_labels = any(t.agl or t.vflow for t in tiles.values())
    if has_rgb and has_labels:
        return "train"
    return "test" if has_rgb else "truth"


def _check_raster(path: Path, bands: int, dtype: str, kind: str) -> tuple[RasterInfo | None, list[Problem]]:
    try:
        info = raster_info(path, decode=True)
    except DataError as e:
        what, _, fix = _reason(e, path).rpartition("; ")
        return None, [Problem(str(path), f"unreadable {kind} image: {what}", fix)]
    problems = []
    if info.count != bands or info.dtype != dtype:
        problems.append(
            Problem(
                str(path),
                f"{kind} is {info.count}-band {info.dtype}, expected {bands}-band {dtype}",
                "convert it to the challenge format" if kind == "RGB" else "rewrite it as uint16 centimetres",
            )
        )
    return info, problems


def _reason(e: DataError, path: Path) -> str:
    text = str(e)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def check_stem(files: StemFiles) -> list[Problem]:
    """Decode and check the files of one stem (the parallel part of validation)."""
    problems: list[Problem] = []
    rgb_info = None
    if files.rgb:
        rgb_info, found = _check_raster(files.rgb[0], 3, "uint8", "RGB")
        problems += found
    if files.agl is not None:
        agl_info, found = _check_raster(files.agl, 1, "uint16", "AGL")
        problems += found
        if rgb_info and agl_info and (rgb_info.width, rgb_info.height) != (agl_info.width, agl_info.height):
            problems.append(
                Problem(
                    str(files.agl),
                    f"AGL is {agl_info.width}x{agl_info.height} but RGB is {rgb_info.width}x{rgb_info.height}",
                    "the two must cover the same pixels; regenerate the pair",
                )
            )
    if files.vflow is not None:
        problems += _check_vflow(files.vflow)
    return problems


def _check_vflow(path: Path) -> list[Problem]:
    try:
        scale, angle = read_vflow(path)
    except DataError as e:
        return [Problem(str(path), _reason(e, path), 'write {"scale": <px per cm>, "angle": <radians>}')]
    problems = []
    if not math.isfinite(scale) or scale < 0:
        problems.append(Problem(str(path), f"scale is {scale / 100!r} px/cm", "it must be a finite number >= 0"))
    if not math.isfinite(angle) or not 0.0 <= angle < TWO_PI:
        problems.append(Problem(str(path), f"angle is {angle!r}", "it must be radians in [0, 2π)"))
    return problems


def _dataset_problems(
    directory: Path, tiles: dict[str, StemFiles], split: str, meta_path: Path | None
) -> list[Problem]:
    """Problems of the dataset as a whole: names, partner files, and the rows of ``meta_path`` for these tiles
    (a metadata.csv covering other tiles too, the data root's for train and test, is judged only on these)."""
    problems: list[Problem] = []
    meta = None
    if meta_path is None:
        if split != "truth":
            problems.append(
                Problem(
                    str(directory / METADATA_FILE),
                    "missing",
                    f"the dataset needs a metadata.csv (id, city, gsd) beside the tiles or at the data root "
                    f"{directory.resolve().parent}; or pass --metadata PATH",
                )
            )
    else:
        try:
            meta = read_metadata(meta_path)
            problems += [
                Problem(str(meta_path), f"id {d} appears more than once", "keep one row per tile")
                for d in metadata_duplicates(meta_path, tiles)
            ]
        except DataError as e:
            problems.append(Problem(str(meta_path), _reason(e, meta_path), "fix or regenerate metadata.csv"))
    for stem, files in sorted(tiles.items()):
        where = str(directory / stem)
        try:
            city = city_of(stem)
        except DataError:
            problems.append(
                Problem(
                    where,
                    "unknown city prefix",
                    f"stems must start with one of {list(CITIES)} and an underscore",
                )
            )
            city = None
        if len(files.rgb) > 1:
            both = " and ".join(p.name for p in files.rgb)
            problems.append(Problem(where, f"duplicate stem: {both}", "keep exactly one RGB file per stem"))
        wanted = {"train": ("RGB", "AGL", "VFLOW"), "test": ("RGB",), "truth": ("AGL", "VFLOW")}[split]
        present = {"RGB": bool(files.rgb), "AGL": files.agl is not None, "VFLOW": files.vflow is not None}
        names = {"RGB": f"{stem}_RGB.j2k (or .tif)", "AGL": f"{stem}_AGL.tif", "VFLOW": f"{stem}_VFLOW.json"}
        for kind in wanted:
            if not present[kind]:
                problems.append(
                    Problem(
                        where,
                        f"missing partner file {kind}",
                        f"add {names[kind]} or remove the stem's other files",
                    )
                )
        if meta is not None:
            row = lookup_metadata(meta, stem)
            if row is None:
                fix = "add id, city and gsd for it, or pass --metadata PATH"
                problems.append(Problem(str(meta_path), f"no row for {stem}", fix))
            else:
                if not (math.isfinite(row.gsd) and row.gsd > 0):
                    problems.append(
                        Problem(str(meta_path), f"gsd of {stem} is {row.gsd!r}", "it must be metres per pixel > 0")
                    )
                if city is not None and row.city != city:
                    problems.append(
                        Problem(
                            str(meta_path),
                            f"city of {stem} is {row.city!r}",
                            f"the stem says {city}; fix one",
                        )
                    )
    return problems


def validate_dir(
    directory: str | Path, split: str = "auto", workers: int | None = None, metadata: str | Path | None = None
) -> Report:
    """Check a dataset directory.

    Args:
        split: ``train``, ``test`` or ``truth`` (which files each stem must have); ``auto`` detects it.
        workers: processes decoding files in parallel (default: one per core).
        metadata: the metadata.csv to check the tiles against (``--metadata``); default the one beside the tiles,
            else the data root's above them (:func:`~geopose_ray.data.layout.locate_metadata`). Only the rows of
            the tiles present are judged. Optional for ``truth``.
    """
    directory = Path(directory)
    tiles = scan_dir(directory)
    if not tiles:
        raise DataError(f"{directory}: no challenge files found (expected *_RGB.j2k, *_AGL.tif, *_VFLOW.json)")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if split == "auto":
        split = detect_split(tiles)
    meta_path = locate_metadata(directory, metadata)
    problems = _dataset_problems(directory, tiles, split, meta_path)
    for found in pmap(check_stem, tiles.values(), workers=workers, desc="validate"):
        problems += found
    return Report(directory, split, len(tiles), problems, meta_path)

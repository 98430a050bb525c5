"""``geopose-ray synth``: a synthetic dataset in the exact challenge layout, with a learnable signal.

Each tile is a small city block seen obliquely: textured ground, roads, trees and buildings of varied
heights. A building's roof is drawn displaced from its footprint by its flow vector
``h · s · (sin θ, cos θ)`` pixels (column, row) with the facade swept in between, so the image shows the
lean. The AGL raster is in image space: roof pixels carry the building height, a facade pixel a fraction of
it, everything else 0; some tiles get no-data patches. Cities differ in ground colour, building heights and
density, ground sample distance and their clusters of flow angles (satellite passes).

The scene is always about 256 nominal pixels wide, rendered at ``size`` pixels, so the recorded gsd (metres
per pixel) and scale (pixels per metre) are physically consistent at any tile size:
``scale = tan(off-nadir) / gsd``. Everything is deterministic for a seed: tile ``i`` draws from
``default_rng([seed, i])``, so results do not depend on the number of workers.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from geopose_ray.data.layout import CITIES, MetadataRow, agl_path, vflow_path, write_metadata, write_vflow
from geopose_ray.data.rasters import write_agl, write_rgb
from geopose_ray.errors import ConfigError
from geopose_ray.geometry import wrap_angle
from geopose_ray.parallel import pmap

REFERENCE_PX = 256  # the nominal width of every synthetic scene, in challenge-resolution pixels


@dataclass(frozen=True)
class CityStyle:
    """How one synthetic city looks."""

    gsd: tuple[float, float]  # nominal metres per pixel at challenge resolution
    angles: tuple[float, ...]  # centres of the flow-angle clusters, radians
    off_nadir_deg: tuple[float, float]  # off-nadir view angle range; scale = tan(off-nadir) / gsd
    ground: tuple[int, int, int]  # base ground colour
    buildings: tuple[int, int]  # number of buildings per scene
    height_median_m: float  # median building height (log-normal)
    height_spread: float  # log-normal sigma of building heights
    trees: tuple[int, int]  # number of trees per scene


CITY_STYLES: dict[str, CityStyle] = {
    "ARG": CityStyle((0.45, 0.55), (0.9, 4.1), (20, 40), (150, 140, 120), (7, 11), 14.0, 0.45, (2, 5)),
    "ATL": CityStyle((0.50, 0.59), (2.4,), (25, 45), (110, 125, 95), (3, 6), 22.0, 0.6, (5, 10)),
    "JAX": CityStyle((0.35, 0.45), (5.3, 0.4), (18, 40), (125, 135, 110), (4, 8), 16.0, 0.5, (4, 8)),
    "OMA": CityStyle((0.30, 0.40), (3.6,), (20, 42), (140, 135, 115), (5, 9), 12.0, 0.5, (3, 6)),
}
ANGLE_SPREAD = 0.25  # radians, sd of a tile's angle around its cluster centre


@dataclass(frozen=True)
class TileLabels:
    """The labels of one synthetic tile."""

    stem: str
    city: str
    gsd: float  # metres per pixel at the rendered size
    scale: float  # pixels per metre
    angle: float  # radians in [0, 2π)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> NDArray[np.float64]:
    """Blocky low-frequency noise in [-1, 1], bilinearly smoothed."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _paint(
    rgb: NDArray[np.float64],
    agl: NDArray[np.float64],
    mask: NDArray[np.bool_],
    top: int,
    left: int,
    colour: NDArray[np.float64],
    height: float,
) -> None:
    """Paint ``mask`` (placed with its corner at row ``top``, column ``left``) clipped to the canvas."""
    size = rgb.shape[0]
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + mask.shape[0], size), min(left + mask.shape[1], size)
    if r0 >= r1 or c0 >= c1:
        return
    m = mask[r0 - top : r1 - top, c0 - left : c1 - left]
    rgb[r0:r1, c0:c1][m] = colour
    agl[r0:r1, c0:c1][m] = height


def draw_object(
    rgb: NDArray[np.float64],
    agl: NDArray[np.float64],
    footprint: NDArray[np.bool_],
    top: int,
    left: int,
    height: float,
    scale: float,
    angle: float,
    roof: NDArray[np.float64],
    facade: NDArray[np.float64] | None,
) -> None:
    """Draw an object of ``height`` metres standing on ``footprint`` (corner at row ``top``, column ``left``).

    The roof lands one flow vector ``height · scale · (sin θ, cos θ)`` (columns, rows) from the footprint,
    carrying AGL ``height``; with a ``facade`` colour the footprint is swept from the ground up to the roof,
    a facade pixel at fraction t of the way carrying AGL ``t · height``. Without one (a tree crown) only the
    top is drawn.
    """
    disp = height * scale
    dx, dy = disp * math.sin(angle), disp * math.cos(angle)
    if facade is not None:
        steps = max(2, math.ceil(disp) + 1)
        for t in np.linspace(0.0, 1.0, steps)[:-1]:
            _paint(rgb, agl, footprint, top + round(t * dy), left + round(t * dx), facade, t * height)
    _paint(rgb, agl, footprint, top + round(dy), left + round(dx), roof, height)


def render_tile(
    rng: np.random.Generator, city: str, size: int
) -> tuple[NDArray[np.uint8], NDArray[np.float32], float, float, float]:
    """Render one tile.

    Returns:
        rgb (size, size, 3) uint8; agl (size, size) float32 metres with NaN no-data patches; gsd (m/px);
        scale (px/m); angle (radians).
    """
    style = CITY_STYLES[city]
    gsd = rng.uniform(*style.gsd) * REFERENCE_PX / size
    scale = math.tan(math.radians(rng.uniform(*style.off_nadir_deg))) / gsd
    angle = float(wrap_angle(rng.choice(style.angles) + rng.normal(0, ANGLE_SPREAD)))
    dx, dy = math.sin(angle), math.cos(angle)  # column and row components of the lean
    max_disp = size / 4  # keep roofs near their footprints

    ground = np.array(style.ground, dtype=np.float64) + rng.normal(0, 8, 3)
    tex = 18 * _smooth_noise(rng, size, 6) + 8 * _smooth_noise(rng, size, max(2, size // 8))
    rgb = ground[None, None, :] + tex[..., None]
    agl = np.zeros((size, size))

    m_per_px = gsd
    for _ in range(rng.integers(1, 4)):  # roads: straight asphalt bands at ground level
        width = max(2, round(rng.uniform(6, 12) / m_per_px))
        pos = int(rng.integers(0, size - width))
        grey = rng.uniform(70, 100)
        if rng.random() < 0.5:
            rgb[pos : pos + width, :] = grey + rng.normal(0, 3, (width, size, 1))
        else:
            rgb[:, pos : pos + width] = grey + rng.normal(0, 3, (size, width, 1))

    objects = []
    for _ in range(rng.integers(*style.buildings)):
        h = float(min(style.height_median_m * math.exp(rng.normal(0, style.height_spread)), max_disp / scale))
        h = max(h, 3.0)
        fw = max(2, round(rng.uniform(8, 32) / m_per_px))
        fh = max(2, round(rng.uniform(8, 32) / m_per_px))
        top, left = int(rng.integers(-fh // 2, size - fh // 2)), int(rng.integers(-fw // 2, size - fw // 2))
        roof = rng.uniform(60, 230, 3)
        objects.append(("building", top, left, np.ones((fh, fw), dtype=bool), h, roof))
    for _ in range(rng.integers(*style.trees)):
        r = max(1, round(rng.uniform(2, 5) / m_per_px))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        h = float(min(rng.uniform(4, 14), max_disp / scale))
        crown = np.array([40, 90, 35], dtype=np.float64) + rng.normal(0, 10, 3)
        top, left = int(rng.integers(-r, size - r)), int(rng.integers(-r, size - r))
        objects.append(("tree", top, left, xx**2 + yy**2 <= r * r, h, crown))

    # Painter's order: tall things lean along +(dx, dy) and hide what lies further along it, so objects
    # further along the lean are painted first.
    objects.sort(key=lambda o: -((o[1] + o[3].shape[0] / 2) * dy + (o[2] + o[3].shape[1] / 2) * dx))
    for kind, top, left, mask, h, colour in objects:
        facade = colour * rng.uniform(0.45, 0.7) if kind == "building" else None
        draw_object(rgb, agl, mask, top, left, h, scale, angle, colour, facade)

    rgb += rng.normal(0, 4, rgb.shape)
    if rng.random() < 0.3:  # no-data patches, as in the real AGL rasters
        for _ in range(rng.integers(1, 3)):
            ph, pw = (int(v) for v in rng.integers(size // 20 + 1, size // 6 + 2, 2))
            r, c = int(rng.integers(0, size - ph)), int(rng.integers(0, size - pw))
            agl[r : r + ph, c : c + pw] = np.nan
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), agl.astype(np.float32), gsd, scale, angle


def _stems(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    letters = np.array(list(string.ascii_uppercase))
    stems: list[str] = []
    while len(stems) < n:
        city = CITIES[len(stems) % len(CITIES)] if len(stems) < len(CITIES) else str(rng.choice(CITIES))
        stem = f"{city}_{''.join(rng.choice(letters, 6))}"
        if stem not in taken:
            taken.add(stem)
            stems.append(stem)
    return stems


@dataclass(frozen=True)
class _Job:
    index: int
    stem: str
    seed: int
    size: int
    image_dir: Path
    label_dir: Path
    rgb_ext: str


def _write_tile(job: _Job) -> TileLabels:
    rng = np.random.default_rng([job.seed, job.index])
    city = job.stem.split("_")[0]
    rgb, agl, gsd, scale, angle = render_tile(rng, city, job.size)
    write_rgb(job.image_dir / f"{job.stem}_RGB{job.rgb_ext}", rgb)
    write_agl(agl_path(job.label_dir, job.stem), agl)
    write_vflow(vflow_path(job.label_dir, job.stem), scale, angle)
    return TileLabels(job.stem, city, gsd, scale, angle)


def synthesize(
    out: str | Path,
    tiles: int,
    size: int = 256,
    seed: int = 0,
    test_tiles: int | None = None,
    rgb_ext: str = ".j2k",
    workers: int | None = None,
) -> dict[str, list[TileLabels]]:
    """Write ``out/train`` (RGB, AGL, VFLOW, metadata.csv), ``out/test`` (RGB, metadata.csv) and
    ``out/test_truth`` (AGL, VFLOW, metadata.csv).

    Args:
        tiles: training tiles; the first four cover every city once, the rest draw cities at random.
        size: tile side in pixels.
        test_tiles: default ``max(4, tiles // 4)``.
        rgb_ext: ``.j2k`` (the challenge's format) or ``.tif``.
    """
    if tiles < 1:
        raise ConfigError(f"The value of `tiles` is {tiles}, but must be `tiles >= 1`")
    if size < 32:
        raise ConfigError(f"The value of `size` is {size}, but must be `size >= 32` pixels")
    if rgb_ext not in (".j2k", ".tif"):
        raise ConfigError(f"The value of `rgb_ext` is {rgb_ext!r}, but must be one of ['.j2k', '.tif']")
    test_tiles = max(4, tiles // 4) if test_tiles is None else test_tiles
    out = Path(out)
    dirs = {name: out / name for name in ("train", "test", "test_truth")}
    for d in dirs.values():
        if d.is_dir() and any(d.iterdir()):
            raise ConfigError(f"{d}: not empty; synthesize into a new directory or delete this one first")
        d.mkdir(parents=True, exist_ok=True)
    names_rng = np.random.default_rng([seed, 2**31])
    taken: set[str] = set()
    train_stems = _stems(names_rng, tiles, taken)
    test_stems = _stems(names_rng, test_tiles, taken)
    jobs = [_Job(i, s, seed, size, dirs["train"], dirs["train"], rgb_ext) for i, s in enumerate(train_stems)]
    jobs += [
        _Job(tiles + i, s, seed, size, dirs["test"], dirs["test_truth"], rgb_ext) for i, s in enumerate(test_stems)
    ]
    labels = list(pmap(_write_tile, jobs, workers=workers, desc="synth"))
    train, test = labels[:tiles], labels[tiles:]
    write_metadata(dirs["train"] / "metadata.csv", [MetadataRow(t.stem, t.city, t.gsd) for t in train])
    for name in ("test", "test_truth"):
        write_metadata(dirs[name] / "metadata.csv", [MetadataRow(t.stem, t.city, t.gsd) for t in test])
    return {"train": train, "test": test}

"""The synthetic city: layout, determinism, city styles, and labels that agree with the drawn geometry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from geopose_ray.data.layout import CITIES, read_metadata, read_vflow, scan_dir
from geopose_ray.data.rasters import read_agl, read_rgb
from geopose_ray.data.synth import CITY_STYLES, REFERENCE_PX, draw_object, render_tile, synthesize
from geopose_ray.errors import ConfigError
from geopose_ray.geometry import angle_error


def _digest(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            data = read_rgb(p).tobytes() if p.name.endswith("_RGB.j2k") else p.read_bytes()
            out[str(p.relative_to(d))] = hashlib.sha256(data).hexdigest()
    return out


def test_layout_of_the_three_splits(dataset: Path) -> None:
    train, test, truth = (scan_dir(dataset / s) for s in ("train", "test", "test_truth"))
    assert len(train) == 16 and len(test) == 4 and set(test) == set(truth)
    assert not set(train) & set(test)
    assert all(f.rgb and f.agl and f.vflow for f in train.values())
    assert all(f.rgb and f.agl is None and f.vflow is None for f in test.values())
    assert all(not f.rgb and f.agl and f.vflow for f in truth.values())
    assert {s[:3] for s in train} == set(CITIES)
    assert all(len(s.split("_")[1]) == 6 and s.split("_")[1].isupper() for s in train)
    for split in ("train", "test", "test_truth"):
        meta = read_metadata(dataset / split / "metadata.csv")
        assert set(meta) == set(train if split == "train" else test)


def test_same_seed_same_bytes_regardless_of_workers(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", 6, 64, seed=5, workers=1)
    synthesize(tmp_path / "b", 6, 64, seed=5, workers=2)
    synthesize(tmp_path / "c", 6, 64, seed=6, workers=1)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a.keys() != c.keys() or a != c


def test_city_styles_show_in_gsd_and_angles() -> None:
    size = 64
    for city, style in CITY_STYLES.items():
        for i in range(8):
            _, _, gsd, scale, angle = render_tile(np.random.default_rng([1, i]), city, size)
            lo, hi = (g * REFERENCE_PX / size for g in style.gsd)
            assert lo <= gsd <= hi
            off_nadir = np.degrees(np.arctan(scale * gsd))  # scale = tan(off-nadir) / gsd
            assert style.off_nadir_deg[0] - 1e-9 <= off_nadir <= style.off_nadir_deg[1] + 1e-9
            assert min(float(angle_error(angle, c)) for c in style.angles) < 1.2  # near one of the passes
            assert 0 <= angle < 2 * np.pi


def test_no_data_patches_appear() -> None:
    tiles = [render_tile(np.random.default_rng([2, i]), "JAX", 64)[1] for i in range(20)]
    with_nodata = sum(bool(np.isnan(a).any()) for a in tiles)
    assert 1 <= with_nodata <= 15
    assert all(np.nanmax(a) > 2.0 for a in tiles)  # every tile has something tall


@pytest.mark.parametrize("angle", [0.0, 0.6, np.pi / 2, 2.5, np.pi, 4.0, 3 * np.pi / 2, 5.9])
def test_a_building_leans_along_its_flow_vector(angle: float) -> None:
    """On an empty canvas: the roof is the footprint moved by h·s·(sin θ, cos θ) (columns, rows), and the
    facade climbs from 0 at the footprint to h at the roof. A sign or sin/cos swap breaks this."""
    size, top, left, h, scale = 64, 26, 26, 10.0, 1.2
    rgb, agl = np.zeros((size, size, 3)), np.zeros((size, size))
    footprint = np.ones((8, 8), dtype=bool)
    draw_object(rgb, agl, footprint, top, left, h, scale, angle, np.ones(3), np.full(3, 0.5))
    dc, dr = round(h * scale * np.sin(angle)), round(h * scale * np.cos(angle))
    roof = np.zeros((size, size), dtype=bool)
    roof[top + dr : top + dr + 8, left + dc : left + dc + 8] = True
    np.testing.assert_array_equal(agl == h, roof)
    assert (rgb[roof] == 1).all()
    facade = (agl > 0) & (agl < h)
    assert facade.sum() > 0
    # Height grows along the lean: project facade pixels on the flow direction.
    rows, cols = np.nonzero(facade)
    along = (cols - left) * np.sin(angle) + (rows - top) * np.cos(angle)
    assert np.corrcoef(along, agl[facade])[0, 1] > 0.8
    # Every drawn pixel, moved back by its own height's flow, lands on the footprint.
    rows, cols = np.nonzero(agl > 0)
    back_r = np.rint(rows - agl[rows, cols] * scale * np.cos(angle)).astype(int)
    back_c = np.rint(cols - agl[rows, cols] * scale * np.sin(angle)).astype(int)
    inside = (back_r >= top - 1) & (back_r < top + 9) & (back_c >= left - 1) & (back_c < left + 9)
    assert inside.all()


def test_a_tree_crown_floats_without_facade() -> None:
    rgb, agl = np.zeros((32, 32, 3)), np.zeros((32, 32))
    draw_object(rgb, agl, np.ones((3, 3), dtype=bool), 10, 10, 5.0, 1.0, np.pi / 2, np.ones(3), None)
    assert set(np.unique(agl)) == {0.0, 5.0}
    assert (agl[10:13, 15:18] == 5.0).all()  # moved 5 columns right (θ = π/2 leans along +x)


def test_files_hold_what_the_renderer_drew(tmp_path: Path) -> None:
    labels = synthesize(tmp_path, 4, 64, seed=9, workers=1)["train"]
    for t in labels:
        rgb, agl, _, scale, angle = render_tile(np.random.default_rng([9, labels.index(t)]), t.city, 64)
        np.testing.assert_array_equal(read_rgb(tmp_path / "train" / f"{t.stem}_RGB.j2k"), rgb)
        stored = read_agl(tmp_path / "train" / f"{t.stem}_AGL.tif")
        np.testing.assert_array_equal(np.isnan(stored), np.isnan(agl))
        np.testing.assert_allclose(stored, np.rint(agl * 100) / 100, atol=1e-5)
        s, a = read_vflow(tmp_path / "train" / f"{t.stem}_VFLOW.json")
        assert s == pytest.approx(scale, rel=1e-12) and a == angle


@pytest.mark.parametrize(("kwargs", "message"), [({"tiles": 0}, "tiles >= 1"), ({"size": 8}, "size >= 32")])
def test_bad_arguments_are_config_errors(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    args = {"tiles": 4, "size": 64} | kwargs
    with pytest.raises(ConfigError, match=message):
        synthesize(tmp_path, **args)


def test_refuses_to_mix_into_an_existing_dataset(tmp_path: Path) -> None:
    synthesize(tmp_path, 4, 64, seed=1, workers=1)
    with pytest.raises(ConfigError, match=r"train: not empty; synthesize into a new directory"):
        synthesize(tmp_path, 8, 64, seed=2, workers=1)

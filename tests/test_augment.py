"""Augmentations keep labels consistent with the geometry they produce."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from geopose_ray.data.augment import AugmentConfig, GeoSample, affine, augment, flip_columns, flip_rows, rot90
from geopose_ray.data.synth import draw_object
from geopose_ray.errors import ConfigError

SIZE = 96


def _scene(angle: float, scale: float, boxes: list[tuple[int, int, int, int, float]]) -> tuple[GeoSample, np.ndarray]:
    """Buildings (top, left, height px, width px, height m) drawn on an empty canvas, and their footprints."""
    rgb, agl = np.zeros((SIZE, SIZE, 3)), np.zeros((SIZE, SIZE))
    footprints = np.zeros((SIZE, SIZE), dtype=bool)
    for top, left, fh, fw, h in boxes:
        draw_object(
            rgb, agl, np.ones((fh, fw), dtype=bool), top, left, h, scale, angle, np.full(3, 200.0), np.full(3, 90.0)
        )
        footprints[top : top + fh, left : left + fw] = True
    return GeoSample(rgb.astype(np.uint8), agl.astype(np.float32), scale, angle), footprints


def _on_footprints(s: GeoSample, footprints: np.ndarray) -> float:
    """Share of the elevated pixels that land on a footprint when moved back along their own flow vector, rounded
    to whole pixels as draw_object rounds it forward (a pixel at f + round(d) goes back to itself minus round(d);
    rounding p − d instead misses by one wherever d is a half pixel, as 3 m at 0.5 px/m is)."""
    rows, cols = np.nonzero(np.nan_to_num(s.agl) > 0)
    h = s.agl[rows, cols]
    back_r = np.clip(rows - np.rint(h * s.scale * np.cos(s.angle)).astype(int), 0, SIZE - 1)
    back_c = np.clip(cols - np.rint(h * s.scale * np.sin(s.angle)).astype(int), 0, SIZE - 1)
    return float(footprints[back_r, back_c].mean())


boxes = st.lists(
    st.tuples(st.integers(20, 60), st.integers(20, 60), st.integers(4, 10), st.integers(4, 10), st.floats(3.0, 15.0)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=40, deadline=None)
@given(angle=st.floats(0, 2 * math.pi, exclude_max=True), scale=st.floats(0.3, 1.5), scene=boxes, k=st.integers(0, 3))
@example(angle=0.0, scale=0.5, scene=[(20, 20, 4, 4, 3.0)], k=0)  # a half-pixel lean (1.5 px), found by hypothesis
def test_rot90_and_flips_equal_drawing_in_the_transformed_frame(
    angle: float, scale: float, scene: list[tuple[int, int, int, int, float]], k: int
) -> None:
    """The augmented labels equal the labels recomputed from the augmented geometry: every elevated pixel,
    moved back along its augmented flow vector, lands on the augmented footprints."""
    sample, footprints = _scene(angle, scale, scene)
    assert _on_footprints(sample, footprints) == 1.0
    for op, fp_op in (
        (lambda s: rot90(s, k), lambda f: np.rot90(f, k)),
        (flip_columns, lambda f: f[:, ::-1]),
        (flip_rows, lambda f: f[::-1]),
    ):
        out = op(sample)
        assert _on_footprints(out, fp_op(footprints)) == 1.0
        assert out.scale == sample.scale
        np.testing.assert_array_equal(np.sort(out.agl.ravel()), np.sort(sample.agl.ravel()))  # heights unchanged


@pytest.mark.parametrize("angle", [0.3, 2.0, 4.4])
@pytest.mark.parametrize(("alpha_deg", "zoom"), [(35.0, 1.0), (-60.0, 0.8), (20.0, 1.25)])
def test_arbitrary_rotation_and_zoom_keep_labels_consistent(angle: float, alpha_deg: float, zoom: float) -> None:
    """Same property through interpolation (so within one pixel); the wrong sign of the angle change or a
    scale not multiplied by the zoom fails it by a wide margin."""
    sample, footprints = _scene(angle, 1.2, [(36, 40, 10, 14, 12.0), (60, 20, 6, 8, 6.0)])
    out = affine(sample, math.radians(alpha_deg), zoom)
    moved = affine(GeoSample(sample.image, footprints.astype(np.float32), 1.0, 0.0), math.radians(alpha_deg), zoom)
    fp = ndimage.binary_dilation(np.nan_to_num(moved.agl) > 0.5, iterations=1)
    assert out.scale == pytest.approx(1.2 * zoom)
    assert _on_footprints(out, fp) > 0.97
    wrong_sign = GeoSample(out.image, out.agl, out.scale, angle - math.radians(alpha_deg))
    assert _on_footprints(wrong_sign, fp) < 0.8
    if zoom != 1.0:
        wrong_scale = GeoSample(out.image, out.agl, 1.2, out.angle)
        assert _on_footprints(wrong_scale, fp) < _on_footprints(out, fp)


def test_new_borders_are_no_data_not_zero_height() -> None:
    sample, _ = _scene(1.0, 1.0, [(40, 40, 8, 8, 10.0)])
    out = affine(sample, math.radians(45), 1.0)
    assert np.isnan(out.agl[0, 0]) and np.isnan(out.agl[-1, -1])  # corners come from outside the tile
    assert (out.image[0, 0] == 0).all()
    shrunk = affine(sample, 0.0, 0.5)
    assert np.isnan(shrunk.agl[:10]).all() and np.isfinite(shrunk.agl[40:56, 40:56]).all()


def test_random_streams_are_reproducible_and_independent() -> None:
    sample, _ = _scene(1.0, 1.0, [(40, 40, 8, 8, 10.0)])
    cfg = AugmentConfig(rot90=True, flip=True, rotate_deg=30, zoom=(0.8, 1.2))
    a = augment(sample, cfg, np.random.default_rng([0, 1, 2]))
    b = augment(sample, cfg, np.random.default_rng([0, 1, 2]))
    assert a.angle == b.angle and np.array_equal(np.nan_to_num(a.agl), np.nan_to_num(b.agl))
    angles = {augment(sample, cfg, np.random.default_rng([0, epoch, 2])).angle for epoch in range(20)}
    assert len(angles) == 20  # another epoch, another draw


def test_dataset_draws_per_sample_and_epoch(cache: object) -> None:
    from geopose_ray.data.dataset import GeoposeDataset

    ds = GeoposeDataset(cache, augment=AugmentConfig(rotate_deg=30), seed=3)  # type: ignore[arg-type]
    first = ds[0]["angle"].item()
    assert ds[0]["angle"].item() == first  # same (seed, epoch, index): same sample
    ds.set_epoch(1)
    assert ds[0]["angle"].item() != first
    plain = GeoposeDataset(cache)  # type: ignore[arg-type]
    assert plain[0]["angle"].item() == pytest.approx(plain.rows[0].angle)


@pytest.mark.parametrize(("kwargs", "message"), [({"rotate_deg": -1}, "rotate_deg"), ({"zoom": (1.2, 1.0)}, "zoom")])
def test_bad_augment_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AugmentConfig(**kwargs)  # type: ignore[arg-type]

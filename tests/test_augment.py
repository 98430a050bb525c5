"""Augmentations keep labels consistent with the geometry they produce."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from geopose_ray.data.augment import (
    AugmentConfig,
    GeoSample,
    PhotometricConfig,
    affine,
    augment,
    flip_columns,
    flip_rows,
    hue_matrix,
    photometric,
    rot90,
)
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


# -- photometric ------------------------------------------------------------------------------------------------

EVERY = PhotometricConfig(
    p=1.0, brightness=0.2, contrast=0.2, gamma=(0.7, 1.4), hue=0.1, saturation=0.5, noise=4.0, dropout=3
)


def _sample(seed: int) -> GeoSample:
    rng = np.random.default_rng(seed)
    agl = rng.uniform(0, 30, (24, 32)).astype(np.float32)
    agl[rng.random(agl.shape) < 0.1] = np.nan
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return GeoSample(image, agl, 0.7, 1.1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_photometric_changes_the_image_only(seed: int) -> None:
    """Labels are bit-identical with and without the photometric block for the same draws (geometry included);
    the image changes, deterministically for a seed."""
    geometric = AugmentConfig(rot90=True, flip=True, rotate_deg=20.0, zoom=(0.9, 1.1))
    coloured = AugmentConfig(rot90=True, flip=True, rotate_deg=20.0, zoom=(0.9, 1.1), photometric=EVERY)
    plain = augment(_sample(seed), geometric, np.random.default_rng([seed, 1]))
    jittered = augment(_sample(seed), coloured, np.random.default_rng([seed, 1]))
    again = augment(_sample(seed), coloured, np.random.default_rng([seed, 1]))
    np.testing.assert_array_equal(plain.agl, jittered.agl)  # NaN positions included
    assert (plain.scale, plain.angle) == (jittered.scale, jittered.angle)
    assert not np.array_equal(plain.image, jittered.image)
    np.testing.assert_array_equal(jittered.image, again.image)
    other = augment(_sample(seed), coloured, np.random.default_rng([seed, 2]))
    assert not np.array_equal(other.image, jittered.image)


def test_each_photometric_effect_does_what_it_says() -> None:
    flat = np.full((40, 40, 3), 100, dtype=np.uint8)
    rng = np.random.default_rng(0)
    shifted = photometric(flat, PhotometricConfig(p=1.0, brightness=0.2), np.random.default_rng(0))
    draw = rng.random(8)[1]
    assert np.all(shifted == round(100 + (2 * draw - 1) * 0.2 * 255))
    ramp = np.tile(np.arange(0, 200, 5, dtype=np.uint8)[None, :, None], (40, 1, 3))
    contrasted = photometric(ramp, PhotometricConfig(p=1.0, contrast=0.5), np.random.default_rng(1))
    assert abs(contrasted.astype(float).mean() - ramp.astype(float).mean()) < 1.0  # about the mean
    assert contrasted.std() != pytest.approx(ramp.std(), rel=0.01)
    gamma = photometric(flat, PhotometricConfig(p=1.0, gamma=(2.0, 2.0)), np.random.default_rng(0))
    assert np.all(gamma == round(255 * (100 / 255) ** 2))
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[..., 0] = 200
    grey = photometric(colour, PhotometricConfig(p=1.0, saturation=1.0), np.random.default_rng(0))
    factor = 1 + (2 * np.random.default_rng(0).random(8)[4] - 1)
    luma = 0.299 * 200
    assert np.allclose(grey[0, 0], np.clip(np.rint(luma + (np.array([200, 0, 0]) - luma) * factor), 0, 255))
    np.testing.assert_allclose(hue_matrix(0.0), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(hue_matrix(1 / 3) @ np.array([1.0, 0, 0]), [0, 1, 0], atol=1e-6)  # red to green
    np.testing.assert_allclose(hue_matrix(0.2) @ np.ones(3), np.ones(3), atol=1e-6)  # grey stays grey
    noisy = photometric(flat, PhotometricConfig(p=1.0, noise=5.0), np.random.default_rng(3)).astype(float)
    assert noisy.std() == pytest.approx(5.0, rel=0.1) and abs(noisy.mean() - 100) < 0.5
    holes = photometric(ramp, PhotometricConfig(p=1.0, dropout=1, dropout_size=(0.25, 0.25)), np.random.default_rng(4))
    changed = np.argwhere(np.any(holes != ramp, axis=-1))
    assert len(changed) <= 10 * 10 and np.ptp(changed[:, 0]) < 10 and np.ptp(changed[:, 1]) < 10
    assert np.array_equal(photometric(ramp, PhotometricConfig(p=0.0, brightness=0.5), rng), ramp)  # p = 0: never


def test_photometric_config_from_yaml_values_and_checks() -> None:
    cfg = AugmentConfig(photometric={"brightness": 0.1, "gamma": [0.8, 1.2]})  # type: ignore[arg-type]
    assert cfg.photometric == PhotometricConfig(brightness=0.1, gamma=(0.8, 1.2))
    assert AugmentConfig(**dataclasses.asdict(cfg)) == cfg  # a checkpoint's plain dict builds it again
    with pytest.raises(ConfigError, match=r"`photometric.hue` is 0.7, but must be in \[0, 0.5\]"):
        PhotometricConfig(hue=0.7)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\] in `augment.photometric`"):
        AugmentConfig(photometric={"colour": 1})  # type: ignore[arg-type]

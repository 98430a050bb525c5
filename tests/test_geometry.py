"""The flow convention: ``v = h·s·(sin θ, cos θ)`` as (column, row), ``θ = atan2(x, y)`` in [0, 2π)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from geopose_ray.geometry import (
    TWO_PI,
    angle_error,
    angle_to_direction,
    direction_to_angle,
    flow_field,
    wrap_angle,
)

ULP_2PI = math.ulp(TWO_PI)
angles_0_2pi = st.floats(min_value=0.0, max_value=TWO_PI, exclude_max=True, allow_nan=False)
near_ends = st.one_of(
    st.floats(min_value=0.0, max_value=1e-6),
    st.floats(min_value=TWO_PI - 1e-6, max_value=TWO_PI, exclude_max=True),
)
any_angle = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
component = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)

# (angle, expected unit direction (x = column, y = row)) — docs/formats-and-score.md: θ = 0 points down the rows (+y),
# increasing counter-clockwise (as seen with rows going down): π/2 → +x, π → −y, 3π/2 → −x.
HAND_CASES = [
    (0.0, (0.0, 1.0)),
    (math.pi / 2, (1.0, 0.0)),
    (math.pi, (0.0, -1.0)),
    (3 * math.pi / 2, (-1.0, 0.0)),
    (math.pi / 4, (math.sqrt(0.5), math.sqrt(0.5))),
    (math.pi / 6, (0.5, math.sqrt(3) / 2)),  # asymmetric: catches a sin/cos swap
]


def _close_angle(a: float, b: float, tol: float = 1e-9) -> bool:
    return float(angle_error(a, b)) <= tol


@pytest.mark.parametrize(("angle", "xy"), HAND_CASES)
def test_angle_to_direction_hand_cases(angle: float, xy: tuple[float, float]) -> None:
    """Angle → (x, y): θ=0 is +y (down the rows), θ=π/2 is +x (columns); guards sin/cos swap, sign flips."""
    x, y = angle_to_direction(angle)
    assert float(x) == pytest.approx(xy[0], abs=1e-12)
    assert float(y) == pytest.approx(xy[1], abs=1e-12)


@pytest.mark.parametrize(("angle", "xy"), HAND_CASES)
def test_direction_to_angle_hand_cases(angle: float, xy: tuple[float, float]) -> None:
    """(x, y) → angle, the other way: atan2(x, y), not atan2(y, x), wrapped to [0, 2π)."""
    got = float(direction_to_angle(*xy))
    assert 0.0 <= got < TWO_PI
    assert got == pytest.approx(angle, abs=1e-12)


@pytest.mark.parametrize(("angle", "xy"), HAND_CASES)
def test_flow_field_hand_cases(angle: float, xy: tuple[float, float]) -> None:
    """flow_field returns (2, H, W) with [0] the column offset and [1] the row offset, ``h·s`` long."""
    agl = np.array([[0.0, 1.0], [2.5, np.nan]])
    scale = 4.0
    flow = flow_field(agl, scale, angle)
    assert flow.shape == (2, 2, 2)
    assert flow.dtype == np.float64
    for k in range(2):
        expected = agl * scale * xy[k]
        np.testing.assert_allclose(flow[k], expected, atol=1e-12, equal_nan=True)
    assert np.isnan(flow[:, 1, 1]).all()


def test_flow_field_theta_zero_points_down_rows() -> None:
    """The defining case written out: θ=0, h=2 m, s=3 px/m → 6 px straight down the rows, none across."""
    flow = flow_field(np.array([[2.0]]), 3.0, 0.0)
    assert flow[0, 0, 0] == 0.0
    assert flow[1, 0, 0] == 6.0


@settings(max_examples=200, deadline=None)
@given(angles_0_2pi)
@example(0.0)
@example(5e-324)
@example(TWO_PI - ULP_2PI)
@example(math.pi)
@example(math.nextafter(math.pi, 0.0))
def test_angle_direction_angle_round_trip(angle: float) -> None:
    """angle → direction → angle is the identity modulo 2π, in range, including next to 0 and 2π."""
    got = float(direction_to_angle(*angle_to_direction(angle)))
    assert 0.0 <= got < TWO_PI
    assert _close_angle(got, angle)


@settings(max_examples=100, deadline=None)
@given(near_ends)
def test_round_trip_near_zero_and_two_pi(angle: float) -> None:
    """Near the seam a round trip may land on the other side of 0/2π but never outside [0, 2π)."""
    got = float(direction_to_angle(*angle_to_direction(angle)))
    assert 0.0 <= got < TWO_PI
    assert _close_angle(got, angle, 1e-12)


@settings(max_examples=200, deadline=None)
@given(component, component, st.floats(min_value=1e-3, max_value=1e3))
def test_direction_angle_direction_round_trip(x: float, y: float, k: float) -> None:
    """direction_to_angle takes non-normalised vectors: (x, y) and k·(x, y) give one angle, whose unit
    direction is (x, y)/‖(x, y)‖."""
    norm = math.hypot(x, y)
    if norm < 1e-9:
        return
    a = float(direction_to_angle(x, y))
    assert 0.0 <= a < TWO_PI
    assert _close_angle(float(direction_to_angle(k * x, k * y)), a)
    ux, uy = angle_to_direction(a)
    assert float(ux) == pytest.approx(x / norm, abs=1e-9)
    assert float(uy) == pytest.approx(y / norm, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(angles_0_2pi, st.floats(min_value=0.01, max_value=200.0), st.floats(min_value=0.01, max_value=10.0))
def test_flow_to_angle_recovers_angle(angle: float, h: float, scale: float) -> None:
    """The angle of a flow vector of positive height is the tile angle; its length is ``h·s``."""
    flow = flow_field(np.array([[h]]), scale, angle)
    x, y = float(flow[0, 0, 0]), float(flow[1, 0, 0])
    assert _close_angle(float(direction_to_angle(x, y)), angle)
    assert math.hypot(x, y) == pytest.approx(h * scale, rel=1e-12)


def test_direction_to_angle_not_normalised_hand_cases() -> None:
    """Non-unit vectors: (5, 0) → π/2, (0, −0.2) → π, (−3, −3) → 5π/4, (1e-9, 1e-9) → π/4."""
    xs = np.array([5.0, 0.0, -3.0, 1e-9, 0.0])
    ys = np.array([0.0, -0.2, -3.0, 1e-9, 7.0])
    expected = np.array([math.pi / 2, math.pi, 5 * math.pi / 4, math.pi / 4, 0.0])
    np.testing.assert_allclose(direction_to_angle(xs, ys), expected, atol=1e-12)


def test_direction_to_angle_tiny_negative_x_stays_in_range() -> None:
    """atan2 of (−tiny, +y) is −tiny; wrapped it must be < 2π (0 here), never exactly 2π."""
    for x in (-1e-300, -5e-324, -1e-17):
        a = float(direction_to_angle(x, 1.0))
        assert 0.0 <= a < TWO_PI
        assert _close_angle(a, 0.0, 1e-15)


@settings(max_examples=300, deadline=None)
@given(any_angle)
@example(-1e-300)
@example(-5e-324)
@example(-1e-17)
@example(-0.0)
@example(TWO_PI)
@example(-TWO_PI)
@example(2 * TWO_PI)
def test_wrap_angle_range_and_congruence(angle: float) -> None:
    """wrap_angle lands in [0, 2π) (np.mod alone gives exactly 2π for tiny negatives) and keeps sin/cos."""
    w = float(wrap_angle(angle))
    assert 0.0 <= w < TWO_PI
    tol = 1e-12 * (1.0 + abs(angle))
    assert math.sin(w) == pytest.approx(math.sin(angle), abs=tol)
    assert math.cos(w) == pytest.approx(math.cos(angle), abs=tol)


def test_wrap_angle_hand_values() -> None:
    """Exact values: −π/2 → 3π/2, 2π → 0, 5π → π, 0 → 0, tiny negative → 0 (2π rounds back to 0)."""
    got = wrap_angle(np.array([-math.pi / 2, TWO_PI, 5 * math.pi, 0.0, -1e-20]))
    np.testing.assert_allclose(got, [3 * math.pi / 2, 0.0, math.pi, 0.0, 0.0], atol=1e-12)
    assert float(wrap_angle(-1e-20)) == 0.0
    assert got.dtype == np.float64


@settings(max_examples=300, deadline=None)
@given(any_angle, any_angle)
def test_angle_error_symmetric_and_bounded(a: float, b: float) -> None:
    """angle_error is symmetric, in [0, π], invariant to adding 2π, and 0 on itself."""
    e = float(angle_error(a, b))
    assert 0.0 <= e <= math.pi
    assert e == pytest.approx(float(angle_error(b, a)), abs=1e-9)
    assert e == pytest.approx(float(angle_error(a + TWO_PI, b)), abs=1e-9)
    assert float(angle_error(a, a)) == 0.0
    # equals the angle between the two unit directions
    cos_between = math.cos(a) * math.cos(b) + math.sin(a) * math.sin(b)
    assert math.cos(e) == pytest.approx(cos_between, abs=1e-9)


@pytest.mark.parametrize(
    ("pred", "true", "expected"),
    [
        (0.1, TWO_PI - 0.1, 0.2),
        (TWO_PI - 0.1, 0.1, 0.2),
        (0.0, math.pi, math.pi),
        (math.pi / 2, 3 * math.pi / 2, math.pi),
        (1.0, 1.5, 0.5),
        (-0.3, 0.3, 0.6),
        (7.0, 7.0 - TWO_PI, 0.0),
    ],
)
def test_angle_error_hand_cases(pred: float, true: float, expected: float) -> None:
    """Wrap-around: 0.1 vs 2π−0.1 is 0.2 rad apart, not 2π−0.2; the largest error is π."""
    assert float(angle_error(pred, true)) == pytest.approx(expected, abs=1e-12)


def test_angle_error_vectorised() -> None:
    """Arrays broadcast elementwise."""
    got = angle_error(np.array([0.1, 3.0]), np.array([TWO_PI - 0.1, 3.0]))
    np.testing.assert_allclose(got, [0.2, 0.0], atol=1e-12)

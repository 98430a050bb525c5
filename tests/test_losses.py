"""The loss terms against direct NumPy computations on tiny hand-made batches, and the R² terms against the score."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from geopose_ray.data.layout import CITIES
from geopose_ray.errors import ConfigError
from geopose_ray.losses import PRESETS, TERMS, LossConfig, LossWeights, geopose_loss, masked_mse
from geopose_ray.metrics import score_report, tile_stats

EPS = 1e-4
ALL_ON = {"agl": 1.0, "mag": 1.0, "xy": 1.0, "scale": 1.0, "huber_agl": 1.0, "huber_mag": 1.0, "focal": 1.0}
ALL_ON |= {"cos": 1.0, "r2_agl": 1.0, "r2_mag": 1.0}


def make_batch(
    seed: int, cities: tuple[int, ...], h: int = 3, w: int = 4, empty: tuple[int, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A batch of len(cities) samples with about a third of the pixels no-data (all of them for ``empty``), and a
    prediction whose errors span small and large values. No-data pixels hold 0 in ``agl`` and garbage in pred."""
    rng = np.random.default_rng(seed)
    b = len(cities)
    valid = rng.random((b, 1, h, w)) > 0.35
    valid[:, 0, 0, 0] = True
    for i in empty:
        valid[i] = False
    agl = np.where(valid, rng.uniform(0.0, 30.0, (b, 1, h, w)), 0.0).astype(np.float32)
    scale = rng.uniform(0.5, 3.0, b).astype(np.float32)
    angle = rng.uniform(0.0, 2 * math.pi, b).astype(np.float32)
    agl_pred = (agl + rng.normal(0.0, 6.0, agl.shape)).astype(np.float32)
    agl_pred[~valid] = 1e3  # wrong, but where there is no data
    mag_pred = (agl * scale[:, None, None, None] + rng.normal(0.0, 12.0, agl.shape)).astype(np.float32)
    xy_pred = rng.normal(0.0, 1.0, (b, 2)).astype(np.float32)
    scale_pred = (scale + rng.normal(0.0, 0.3, b)).astype(np.float32)
    batch = {
        "agl": torch.from_numpy(agl),
        "valid": torch.from_numpy(valid),
        "angle": torch.from_numpy(angle),
        "scale": torch.from_numpy(scale),
        "city": torch.tensor(cities, dtype=torch.int64),
    }
    pred = {
        "agl": torch.from_numpy(agl_pred),
        "mag": torch.from_numpy(mag_pred),
        "xy": torch.from_numpy(xy_pred),
        "scale": torch.from_numpy(scale_pred),
    }
    return pred, batch


def np_of(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {
        k: v.detach().numpy().astype(np.float64) if v.is_floating_point() else v.numpy() for k, v in tensors.items()
    }


def per_sample_mean(per_pixel: np.ndarray, valid: np.ndarray) -> float:
    """Each sample's mean over its valid pixels (0 with none), then the batch mean, in float64 loops."""
    out = []
    for i in range(per_pixel.shape[0]):
        v = valid[i]
        out.append(per_pixel[i][v].sum() / max(int(v.sum()), 1))
    return float(np.mean(out))


def np_truth(b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    mag_true = b["agl"] * b["scale"][:, None, None, None]
    xy_true = np.stack([np.sin(b["angle"]), np.cos(b["angle"])], axis=1)
    return mag_true, xy_true


def np_huber(e: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(e)
    return np.where(a < delta, 0.5 * e * e, delta * (a - 0.5 * delta))


def np_r2(p: dict[str, np.ndarray], b: dict[str, np.ndarray], means: np.ndarray | None) -> tuple[float, float]:
    """(r2_agl, r2_mag): per city with valid pixels SSE / (SST + 1e-4), pooled over its samples; mean over cities."""
    ratios_h, ratios_v = [], []
    for c in sorted(set(b["city"].tolist())):
        hs, es, vs, ves = [], [], [], []
        for i in np.flatnonzero(b["city"] == c):
            v = b["valid"][i, 0]
            h = b["agl"][i, 0][v]
            hs.append(h)
            es.append(p["agl"][i, 0][v] - h)
            s, t = b["scale"][i], b["angle"][i]
            flow = np.stack([h * s * math.sin(t), h * s * math.cos(t)])
            x, y = p["xy"][i]
            m = p["mag"][i, 0][v]
            flow_pred = np.stack([m * x / math.hypot(x, y), m * y / math.hypot(x, y)])
            vs.append(flow)
            ves.append(flow_pred - flow)
        h, e = np.concatenate(hs), np.concatenate(es)
        flow, flow_err = np.concatenate(vs, axis=1), np.concatenate(ves, axis=1)
        if h.size == 0:
            continue
        mu_h = h.sum() / (h.size + EPS) if means is None else means[c, 0]
        mu_v = flow.sum() / (flow.size + EPS) if means is None else means[c, 1]
        ratios_h.append((e**2).sum() / (((h - mu_h) ** 2).sum() + EPS))
        ratios_v.append((flow_err**2).sum() / (((flow - mu_v) ** 2).sum() + EPS))
    return float(np.mean(ratios_h)), float(np.mean(ratios_v))


def damped_means(b: dict[str, np.ndarray]) -> np.ndarray:
    """(len(CITIES), 2) damped (μ_h, μ_v) of each city's valid truth in the batch; 0 for absent cities."""
    out = np.zeros((len(CITIES), 2))
    for c in range(len(CITIES)):
        sel = b["city"] == c
        v = b["valid"][sel]
        h = b["agl"][sel]
        n = v.sum()
        out[c, 0] = h[v].sum() / (n + EPS)
        per_metre = b["scale"][sel] * (np.sin(b["angle"][sel]) + np.cos(b["angle"][sel]))
        out[c, 1] = (per_metre[:, None, None, None] * np.where(v, h, 0.0)).sum() / (2 * n + EPS)
    return out


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------


def test_presets_and_overrides_resolve_every_weight() -> None:
    assert LossWeights is LossConfig
    zero = dict.fromkeys(TERMS, 0.0)
    assert LossConfig().weights() == {**zero, "agl": 1.0, "mag": 2.0, "xy": 10.0, "scale": 10.0}
    assert LossConfig(kind="huber").weights() == {
        **zero, "huber_agl": 1.0, "huber_mag": 2.0, "xy": 10.0, "cos": 10.0, "scale": 10.0
    }  # fmt: skip
    assert LossConfig(kind="r2").weights() == {**zero, "r2_agl": 1.0, "r2_mag": 1.0, "xy": 10.0, "scale": 10.0}
    assert LossConfig(kind="r2_huber").weights() == {
        **zero, "r2_agl": 1.0, "r2_mag": 1.0, "huber_agl": 0.1, "huber_mag": 0.1, "xy": 10.0, "cos": 10.0,
        "scale": 10.0,
    }  # fmt: skip
    assert set(PRESETS) == {"mse", "huber", "r2", "r2_huber"}
    # An override wins over the preset; 0 turns a term off; None keeps the preset's weight.
    w = LossConfig(kind="r2", xy=0, r2_mag=None, focal=0.5).weights()
    assert (w["xy"], w["r2_mag"], w["focal"], w["scale"]) == (0.0, 1.0, 0.5, 10.0)
    assert list(w) == list(TERMS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "l1"}, "The value of `loss.kind` is 'l1', but must be one of ['mse', 'huber', 'r2', 'r2_huber']"),
        ({"mag": -1.0}, "The value of `loss.mag` is -1.0, but must be a weight >= 0"),
        ({"r2_agl": math.nan}, "The value of `loss.r2_agl` is nan, but must be a weight >= 0"),
        ({"cos": "1"}, "The value of `loss.cos` is '1', but must be a weight >= 0"),
        ({"huber_delta_agl": 0.0}, "The value of `loss.huber_delta_agl` is 0.0, but must be a number > 0 (metres)"),
        ({"huber_delta_mag": -2}, "The value of `loss.huber_delta_mag` is -2, but must be a number > 0 (pixels)"),
        ({"focal_beta": 0}, "The value of `loss.focal_beta` is 0, but must be a number > 0 (metres)"),
        ({"focal_gamma": -0.5}, "The value of `loss.focal_gamma` is -0.5, but must be a number >= 0"),
        ({"agl": 0, "mag": 0, "xy": 0, "scale": 0}, "every loss term of `loss` (mse preset) has weight 0"),
    ],
)
def test_a_bad_value_is_a_one_line_error_naming_it(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        LossConfig(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_zero_focal_gamma_and_integer_weights_are_allowed() -> None:
    cfg = LossConfig(kind="huber", focal=2, focal_gamma=0)
    assert cfg.weights()["focal"] == 2.0 and isinstance(cfg.weights()["focal"], float)


# ----------------------------------------------------------------------------------------------------
# the baseline
# ----------------------------------------------------------------------------------------------------


def test_the_mse_preset_is_the_baseline_total_exactly() -> None:
    pred, batch = make_batch(0, (0, 1, 1), empty=(2,))
    parts = geopose_loss(pred, batch)
    assert set(parts) == {"total", "agl", "mag", "xy", "scale"}
    p, b = np_of(pred), np_of(batch)
    mag_true, xy_true = np_truth(b)
    valid = b["valid"]
    expected = {
        "agl": per_sample_mean((p["agl"] - b["agl"]) ** 2, valid),
        "mag": per_sample_mean((p["mag"] - mag_true) ** 2, valid),
        "xy": float(np.mean((p["xy"] - xy_true) ** 2)),
        "scale": float(np.mean((p["scale"] - b["scale"]) ** 2)),
    }
    for k, v in expected.items():
        assert float(parts[k]) == pytest.approx(v, rel=1e-6), k
    baseline = expected["agl"] + 2 * expected["mag"] + 10 * expected["xy"] + 10 * expected["scale"]
    assert float(parts["total"]) == pytest.approx(baseline, rel=1e-6)
    # Bit for bit the former formula, on the former parts.
    mag_t = batch["agl"] * batch["scale"].view(-1, 1, 1, 1)
    xy_t = torch.stack([torch.sin(batch["angle"]), torch.cos(batch["angle"])], dim=1)
    former = (
        1.0 * masked_mse(pred["agl"], batch["agl"], batch["valid"])
        + 2.0 * masked_mse(pred["mag"], mag_t, batch["valid"])
        + 10.0 * torch.mean((pred["xy"] - xy_t) ** 2)
        + 10.0 * torch.mean((pred["scale"] - batch["scale"]) ** 2)
    )
    assert torch.equal(parts["total"], former)
    # Explicit weights equal to the preset's change nothing.
    again = geopose_loss(pred, batch, LossConfig(agl=1.0, mag=2.0, xy=10.0, scale=10.0))
    assert torch.equal(again["total"], parts["total"])


# ----------------------------------------------------------------------------------------------------
# each term against NumPy
# ----------------------------------------------------------------------------------------------------


def test_every_term_matches_numpy_and_the_total_is_the_weighted_sum() -> None:
    # Two cities, one sample with no valid pixel; deltas that put some errors on each side of the kink.
    weights = {**ALL_ON, "agl": 0.5, "r2_mag": 3.0}
    cfg = LossConfig(**weights, huber_delta_agl=4.0, huber_delta_mag=9.0, focal_beta=3.0, focal_gamma=2.0)
    pred, batch = make_batch(1, (1, 3, 1, 3), empty=(2,))
    parts = geopose_loss(pred, batch, cfg)
    assert list(parts) == ["total", *TERMS]
    p, b = np_of(pred), np_of(batch)
    mag_true, xy_true = np_truth(b)
    valid = b["valid"]
    e_agl, e_mag = p["agl"] - b["agl"], p["mag"] - mag_true
    assert (np.abs(e_agl[valid]) < 4.0).any() and (np.abs(e_agl[valid]) > 4.0).any()
    assert (np.abs(e_mag[valid]) < 9.0).any() and (np.abs(e_mag[valid]) > 9.0).any()
    cos = (p["xy"] * xy_true).sum(1) / np.linalg.norm(p["xy"], axis=1)
    r2_agl, r2_mag = np_r2(p, b, None)
    expected = {
        "agl": per_sample_mean(e_agl**2, valid),
        "mag": per_sample_mean(e_mag**2, valid),
        "xy": float(np.mean((p["xy"] - xy_true) ** 2)),
        "scale": float(np.mean((p["scale"] - b["scale"]) ** 2)),
        "huber_agl": per_sample_mean(np_huber(e_agl, 4.0), valid),
        "huber_mag": per_sample_mean(np_huber(e_mag, 9.0), valid),
        "focal": per_sample_mean(np.tanh(np.abs(e_agl) / 3.0) ** 2 * e_agl**2, valid),
        "cos": float(np.mean(1.0 - cos)),
        "r2_agl": r2_agl,
        "r2_mag": r2_mag,
    }
    for k, v in expected.items():
        assert float(parts[k]) == pytest.approx(v, rel=1e-5), k
    assert float(parts["total"]) == pytest.approx(sum(weights[k] * expected[k] for k in TERMS), rel=1e-5)
    # The Huber and focal terms differ from the MSE (a formula mix-up would not).
    assert expected["huber_agl"] < 0.5 * expected["agl"] and expected["focal"] < expected["agl"]


def test_only_terms_with_weight_are_returned_and_zero_weights_add_nothing() -> None:
    pred, batch = make_batch(2, (0, 2))
    parts = geopose_loss(pred, batch, LossConfig(kind="r2"))
    assert list(parts) == ["total", "agl", "mag", "xy", "scale", "r2_agl", "r2_mag"]
    expected = parts["r2_agl"] + parts["r2_mag"] + 10 * parts["xy"] + 10 * parts["scale"]
    assert float(parts["total"]) == pytest.approx(float(expected), rel=1e-6)
    assert not parts["agl"].requires_grad  # reported, not weighted
    pred["agl"].requires_grad_(True)
    assert geopose_loss(pred, batch, LossConfig(kind="r2"))["r2_agl"].requires_grad


def test_per_sample_terms_average_samples_so_accumulation_is_exact() -> None:
    pred, batch = make_batch(3, (0, 0, 1, 2))
    cfg = LossConfig(kind="huber", focal=1.0)
    whole = geopose_loss(pred, batch, cfg)
    halves = [
        geopose_loss({k: v[s] for k, v in pred.items()}, {k: v[s] for k, v in batch.items()}, cfg)
        for s in (slice(0, 1), slice(1, 4))
    ]
    for k in ("huber_agl", "huber_mag", "focal", "cos", "agl", "total"):
        assert float(whole[k]) == pytest.approx((float(halves[0][k]) + 3 * float(halves[1][k])) / 4, rel=1e-6), k


def test_the_focal_weight_is_a_constant_for_the_gradient() -> None:
    pred, batch = make_batch(4, (0, 1))
    pred["agl"].requires_grad_(True)
    cfg = LossConfig(agl=0, mag=0, xy=0, scale=0, focal=1.0, focal_beta=4.0, focal_gamma=1.5)
    geopose_loss(pred, batch, cfg)["total"].backward()
    assert pred["agl"].grad is not None
    p, b = np_of(pred), np_of(batch)
    e = p["agl"] - b["agl"]
    w = np.tanh(np.abs(e) / 4.0) ** 1.5
    n = b["valid"].sum(axis=(1, 2, 3)).reshape(-1, 1, 1, 1)
    expected = np.where(b["valid"], 2 * w * e / n / len(n), 0.0)  # d(w·e²)/de with w held fixed
    np.testing.assert_allclose(pred["agl"].grad.numpy(), expected, rtol=1e-5, atol=1e-8)


def test_the_cosine_term_ignores_length_and_is_zero_on_the_truth() -> None:
    pred, batch = make_batch(5, (0, 1, 2))
    xy_true = torch.stack([torch.sin(batch["angle"]), torch.cos(batch["angle"])], dim=1)
    cfg = LossConfig(cos=1.0)
    pred["xy"] = 3.0 * xy_true
    assert float(geopose_loss(pred, batch, cfg)["cos"]) == pytest.approx(0.0, abs=1e-6)
    pred["xy"] = -0.5 * xy_true
    assert float(geopose_loss(pred, batch, cfg)["cos"]) == pytest.approx(2.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# the R² terms
# ----------------------------------------------------------------------------------------------------


def score_of(pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(AGL R², flow R²) of the batch's single city, by the challenge score."""
    p, b = np_of(pred), np_of(batch)
    tiles = []
    for i in range(len(b["city"])):
        truth = np.where(b["valid"][i, 0], b["agl"][i, 0], np.nan)
        angle_pred = math.atan2(p["xy"][i, 0], p["xy"][i, 1])
        tiles.append(
            tile_stats(
                f"T{i}",
                CITIES[int(b["city"][i])],
                truth,
                float(b["scale"][i]),
                float(b["angle"][i]),
                p["agl"][i, 0],
                float(p["scale"][i]),
                angle_pred,
            )
        )
    report = score_report(tiles)
    (city,) = report.cities.values()
    return city.agl_r2, city.flow_r2


@pytest.mark.parametrize("given_means", [False, True])
def test_the_r2_terms_are_one_minus_the_score_on_a_one_city_batch(given_means: bool) -> None:
    pred, batch = make_batch(6, (2, 2, 2), h=5, w=6)
    pred["mag"] = pred["agl"] * pred["scale"].view(-1, 1, 1, 1)  # the score's flow: ĥ·ŝ along θ̂
    angle_pred = batch["angle"] + torch.tensor([0.15, -0.3, 0.05])
    pred["xy"] = torch.stack([torch.sin(angle_pred), torch.cos(angle_pred)], dim=1)  # unit, a little off
    agl_r2, flow_r2 = score_of(pred, batch)
    assert 0.2 < agl_r2 < 0.99 and 0.2 < flow_r2 < 0.99  # far from trivial values
    means = damped_means(np_of(batch))
    means[[0, 1, 3]] = 123.0  # the other cities' rows must not be read
    city_means = torch.tensor(means, dtype=torch.float32) if given_means else None
    parts = geopose_loss(pred, batch, LossConfig(kind="r2"), city_means=city_means)
    assert float(parts["r2_agl"]) == pytest.approx(1.0 - agl_r2, abs=1e-5)
    assert float(parts["r2_mag"]) == pytest.approx(1.0 - flow_r2, abs=1e-5)


def test_the_flow_r2_term_uses_the_direction_not_its_length() -> None:
    pred, batch = make_batch(7, (1, 1))
    cfg = LossConfig(kind="r2")
    unit = geopose_loss(pred, batch, cfg)["r2_mag"]
    pred["xy"] = pred["xy"] * torch.tensor([[4.0], [0.25]])
    assert float(geopose_loss(pred, batch, cfg)["r2_mag"]) == pytest.approx(float(unit), rel=1e-6)


def test_given_city_means_replace_the_batch_means_per_city() -> None:
    pred, batch = make_batch(8, (0, 3, 3, 0), empty=(1,))
    means = np.array([[4.0, -3.0], [0.0, 0.0], [0.0, 0.0], [20.0, 11.0]])
    parts = geopose_loss(pred, batch, LossConfig(kind="r2"), city_means=torch.tensor(means, dtype=torch.float32))
    p, b = np_of(pred), np_of(batch)
    r2_agl, r2_mag = np_r2(p, b, means)
    assert float(parts["r2_agl"]) == pytest.approx(r2_agl, rel=1e-5)
    assert float(parts["r2_mag"]) == pytest.approx(r2_mag, rel=1e-5)
    assert r2_agl != pytest.approx(np_r2(p, b, None)[0], rel=1e-3)  # the means matter
    with pytest.raises(ConfigError, match=r"city_means has shape \(2, 2\), but must be \(4, 2\)"):
        geopose_loss(pred, batch, LossConfig(kind="r2"), city_means=torch.zeros(2, 2))


def test_a_city_without_valid_pixels_is_left_out_of_the_mean() -> None:
    pred, batch = make_batch(9, (0, 1, 1), empty=(0,))
    parts = geopose_loss(pred, batch, LossConfig(kind="r2"))
    only_one = geopose_loss(
        {k: v[1:] for k, v in pred.items()}, {k: v[1:] for k, v in batch.items()}, LossConfig(kind="r2")
    )
    assert float(parts["r2_agl"]) == pytest.approx(float(only_one["r2_agl"]), rel=1e-6)
    assert float(parts["r2_mag"]) == pytest.approx(float(only_one["r2_mag"]), rel=1e-6)
    pred, batch = make_batch(9, (0, 1), empty=(0, 1))
    parts = geopose_loss(pred, batch, LossConfig(**ALL_ON))
    assert all(math.isfinite(float(v)) for v in parts.values())
    assert float(parts["r2_agl"]) == 0.0 and float(parts["agl"]) == 0.0


# ----------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------


def test_gradients_are_finite_with_empty_samples_zero_directions_and_garbage_at_no_data() -> None:
    pred, batch = make_batch(10, (0, 2, 2), empty=(1,))
    pred["xy"][0] = 0.0  # a zero direction: the cosine and flow terms must not divide by 0
    pred["agl"][~batch["valid"]] = math.inf
    pred["mag"][~batch["valid"]] = math.nan
    for t in pred.values():
        t.requires_grad_(True)
    parts = geopose_loss(pred, batch, LossConfig(**ALL_ON), city_means=torch.zeros(len(CITIES), 2))
    assert all(math.isfinite(float(v.detach())) for v in parts.values())
    parts["total"].backward()
    for k, t in pred.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), k
    assert float(pred["agl"].grad.abs().sum()) > 0 and float(pred["xy"].grad.abs().sum()) > 0


def test_low_precision_predictions_give_float32_losses() -> None:
    pred, batch = make_batch(11, (0, 1))
    full = geopose_loss(pred, batch, LossConfig(kind="r2_huber"))
    half = geopose_loss({k: v.bfloat16() for k, v in pred.items()}, batch, LossConfig(kind="r2_huber"))
    assert all(v.dtype == torch.float32 for v in half.values())
    assert float(half["total"]) == pytest.approx(float(full["total"]), rel=2e-2)

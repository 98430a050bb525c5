"""The geopose loss: a weighted sum of terms, with no-data pixels masked out of the pixel terms.

The terms (weights in :class:`LossConfig`; ĥ, m̂, (x̂, ŷ), ŝ the predictions, h, s, θ the truth, e = ĥ − h):

* ``agl``, ``mag``, ``xy``, ``scale``: the baseline's mean squared errors of AGL (m²), of the magnitude against
  h·s (px²), of the direction against (sin θ, cos θ) and of the scale ((px/m)²);
* ``huber_agl``, ``huber_mag``: Huber losses of AGL and magnitude, ``e²/2`` for ``|e| < δ``, ``δ·(|e| − δ/2)``
  beyond (δ = ``huber_delta_agl`` metres, ``huber_delta_mag`` pixels): quadratic for small errors, linear for
  large ones, so a few wild pixels do not dominate;
* ``focal``: a focal MSE of AGL, per valid pixel ``w·e²`` with ``w = tanh(|e| / focal_beta)^focal_gamma``. The
  weight is a constant for the gradient (detached): pixels already close to the truth (``|e| ≪ beta``) count
  little, hard pixels almost fully. ``focal_gamma = 0`` makes it the plain AGL MSE;
* ``cos``: the direction's cosine loss ``1 − cos((x̂, ŷ), (sin θ, cos θ))``, blind to the vector's length (with
  ``xy`` it is the "cosine + MSE" direction loss);
* ``r2_agl``, ``r2_mag``: the challenge score's own shape, ``1 − R²`` per city (see :func:`r2_terms`).

Per-pixel terms (MSE, Huber, focal) average each sample over its valid pixels (0 for a sample with none), then
average the samples, so a batch's loss is the mean of its samples' losses and gradient accumulation over
micro-batches reproduces the large batch exactly. The R² terms are ratios of sums over the whole batch: under
accumulation the optimizer step sees the (sample-weighted) mean of the micro-batches' ratios, not the ratio of
the large batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geopose_ray.data.layout import CITIES
from geopose_ray.errors import ConfigError

EPS = 1e-4  # the challenge's damping of means and totals (geopose_ray.metrics.EPS)
NORM_EPS = 1e-8  # smallest direction length the cosine and flow terms divide by

TERMS: tuple[str, ...] = ("agl", "mag", "xy", "scale", "huber_agl", "huber_mag", "focal", "cos", "r2_agl", "r2_mag")
MSE_TERMS: tuple[str, ...] = ("agl", "mag", "xy", "scale")

_BASELINE = {"agl": 1.0, "mag": 2.0, "xy": 10.0, "scale": 10.0}
PRESETS: dict[str, dict[str, float]] = {
    name: {term: float(weights.get(term, 0.0)) for term in TERMS}
    for name, weights in {
        "mse": _BASELINE,
        "huber": {"huber_agl": 1.0, "huber_mag": 2.0, "xy": 10.0, "cos": 10.0, "scale": 10.0},
        "r2": {"r2_agl": 1.0, "r2_mag": 1.0, "xy": 10.0, "scale": 10.0},
        "r2_huber": {
            "r2_agl": 1.0,
            "r2_mag": 1.0,
            "huber_agl": 0.1,
            "huber_mag": 0.1,
            "xy": 10.0,
            "cos": 10.0,
            "scale": 10.0,
        },
    }.items()
}


@dataclass(frozen=True)
class LossConfig:
    """Which loss terms, with which weights and parameters (``loss:`` in the training config).

    ``kind`` picks a preset of weights (:data:`PRESETS`); each term's own key overrides it: ``None`` keeps the
    preset's weight, 0 turns the term off. The default, ``kind="mse"`` with no override, is the challenge
    baseline: agl 1, mag 2, xy 10, scale 10. :meth:`weights` gives the resolved weight of every term.
    """

    kind: str = "mse"  # mse | huber | r2 | r2_huber
    agl: float | None = None  # MSE of AGL over valid pixels, m²
    mag: float | None = None  # MSE of magnitude against AGL·scale over valid pixels, px²
    xy: float | None = None  # MSE of the direction (x, y) against (sin θ, cos θ)
    scale: float | None = None  # MSE of the scale, (px/m)²
    huber_agl: float | None = None  # Huber loss of AGL over valid pixels
    huber_mag: float | None = None  # Huber loss of the magnitude over valid pixels
    focal: float | None = None  # focal MSE of AGL: tanh(|e|/focal_beta)^focal_gamma · e², the weight detached
    cos: float | None = None  # 1 − cos of the predicted and true directions
    r2_agl: float | None = None  # per city SSE / (SST + 1e-4) of AGL: 1 − the score's AGL R²
    r2_mag: float | None = None  # per city SSE / (SST + 1e-4) of the flow vectors: 1 − the score's flow R²
    huber_delta_agl: float = 5.0  # metres: where the AGL Huber loss turns from quadratic to linear
    huber_delta_mag: float = 10.0  # pixels: the same for the magnitude
    focal_beta: float = 5.0  # metres: the error at which the focal weight reaches tanh(1) ≈ 0.76
    focal_gamma: float = 1.0  # the focal weight's exponent; 0 weights every pixel 1

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in PRESETS:
            raise ConfigError(f"The value of `loss.kind` is {self.kind!r}, but must be one of {list(PRESETS)}")
        for term in TERMS:
            value = getattr(self, term)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"The value of `loss.{term}` is {value!r}, but must be a weight >= 0 (0 turns the term off) or "
                    f"null for the `{self.kind}` preset's {PRESETS[self.kind][term]:g}"
                )
        for key, unit in (("huber_delta_agl", "metres"), ("huber_delta_mag", "pixels"), ("focal_beta", "metres")):
            value = getattr(self, key)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ConfigError(f"The value of `loss.{key}` is {value!r}, but must be a number > 0 ({unit})")
        if not (_is_number(self.focal_gamma) and math.isfinite(self.focal_gamma) and self.focal_gamma >= 0):
            raise ConfigError(f"The value of `loss.focal_gamma` is {self.focal_gamma!r}, but must be a number >= 0")
        if not any(w > 0 for w in self.weights().values()):
            raise ConfigError(f"every loss term of `loss` ({self.kind} preset) has weight 0; give one a weight > 0")

    def weights(self) -> dict[str, float]:
        """The resolved weight of every term, in :data:`TERMS` order (0 for the terms that are off)."""
        preset = PRESETS[self.kind]
        out: dict[str, float] = {}
        for term in TERMS:
            value = getattr(self, term)
            out[term] = preset[term] if value is None else float(value)
        return out


LossWeights = LossConfig  # the former name, kept for existing imports and configs


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean squared error over its valid pixels (0 if it has none); then the batch mean.

    Averaging per sample first makes a batch's loss the mean of its samples' losses, so gradient
    accumulation over micro-batches reproduces the large batch exactly.
    """
    diff = torch.where(valid, pred.float() - target.float(), torch.zeros((), device=pred.device))
    per_sample = (diff * diff).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)
    return per_sample.mean()


def masked_huber(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, delta: float) -> torch.Tensor:
    """Per sample, the mean Huber loss over its valid pixels (0 if it has none); then the batch mean.

    Per pixel ``e²/2`` for ``|e| < delta``, else ``delta·(|e| − delta/2)``, with ``e = pred − target``.
    """
    diff = torch.where(valid, pred.float() - target.float(), torch.zeros((), device=pred.device))
    err = diff.abs()
    per_pixel = torch.where(err < delta, 0.5 * diff * diff, delta * (err - 0.5 * delta))
    per_sample = per_pixel.sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)
    return per_sample.mean()


def masked_focal_mse(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """Per sample, the mean over its valid pixels of ``w·e²`` with ``w = tanh(|e|/beta)^gamma`` (0 for a sample
    with no valid pixel); then the batch mean. ``w`` is detached: the gradient is ``2·w·e``, easy pixels damped."""
    diff = torch.where(valid, pred.float() - target.float(), torch.zeros((), device=pred.device))
    weight = torch.tanh(diff.detach().abs() / beta).pow(gamma)
    per_sample = (weight * diff * diff).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)
    return per_sample.mean()


def cosine_loss(xy_pred: torch.Tensor, xy_true: torch.Tensor) -> torch.Tensor:
    """The batch mean of ``1 − cos`` of the angle between each predicted and true direction, (B, 2) each."""
    p, t = xy_pred.float(), xy_true.float()
    norms = _norm(p) * _norm(t)
    return (1.0 - (p * t).sum(dim=1) / norms).mean()


def _norm(v: torch.Tensor) -> torch.Tensor:
    """Row lengths of (B, 2), at least NORM_EPS; the clamp keeps the gradient finite at the zero vector."""
    return (v * v).sum(dim=1).clamp(min=NORM_EPS * NORM_EPS).sqrt()


def r2_terms(
    pred: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    city_means: torch.Tensor | None = None,
    which: tuple[str, ...] = ("r2_agl", "r2_mag"),
) -> dict[str, torch.Tensor]:
    """The per-city R² losses of a batch: for each city c with a valid pixel in it, ``SSE_c / (SST_c + 1e-4)``;
    the loss is the mean of those ratios over the cities present (0 when none is).

    * ``r2_agl``: ``SSE_c = Σ(ĥ − h)²`` over the valid pixels of the batch's samples of city c and
      ``SST_c = Σ(h − μ_h,c)²`` over the same pixels;
    * ``r2_mag``: the flow vectors ``v̂ = m̂·(x̂, ŷ)/‖(x̂, ŷ)‖`` (the predicted magnitude along the predicted
      direction) against ``v = h·s·(sin θ, cos θ)``: ``SSE_c = Σ‖v̂ − v‖²``, ``SST_c = Σ_k Σ(v_k − μ_v,c)²`` with
      one scalar mean over both components.

    With ``m̂ = ĥ·ŝ`` and a unit direction these are ``1 − R²_h`` and ``1 − R²_v`` of the challenge score
    (:mod:`geopose_ray.metrics`) of a batch that holds one city, when the means are the score's damped means.

    Args:
        city_means: (len(CITIES), 2) float, per city ``(μ_h, μ_v)``: the damped means of the training set,
            ``μ_h = Σh / (n + 1e-4)`` and ``μ_v = Σ(v_x + v_y) / (2n + 1e-4)``, so every batch measures its
            errors against the same totals the score uses. ``None``: the damped means of each city's valid
            pixels in this batch (which is what the score does on a batch holding all of a city's tiles).
        which: the terms to compute.
    """
    if "city" not in batch:
        raise ConfigError("the r2_agl and r2_mag loss terms need the batch's `city` (index into CITIES)")
    valid = batch["valid"]
    device = valid.device
    n_cities = len(CITIES)
    city = batch["city"].to(device=device, dtype=torch.long).view(-1)
    agl_true = batch["agl"].float()
    zero = torch.zeros((), device=device)
    h = torch.where(valid, agl_true, zero)
    count = valid.sum(dim=(1, 2, 3)).float()
    n_c = torch.zeros(n_cities, device=device).index_add(0, city, count)
    present = n_c > 0
    if city_means is not None:
        if tuple(city_means.shape) != (n_cities, 2):
            raise ConfigError(
                f"city_means has shape {tuple(city_means.shape)}, but must be ({n_cities}, 2): (μ_h, μ_v) for each "
                f"of {list(CITIES)}"
            )
        means = city_means.to(device=device, dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}

    def per_city_mean_ratio(sse: torch.Tensor, sst: torch.Tensor) -> torch.Tensor:
        sse_c = torch.zeros(n_cities, device=device).index_add(0, city, sse)
        sst_c = torch.zeros(n_cities, device=device).index_add(0, city, sst)
        ratio = torch.where(present, sse_c / (sst_c + EPS), zero)
        return ratio.sum() / present.sum().clamp(min=1)

    if "r2_agl" in which:
        if city_means is None:
            sum_h = torch.zeros(n_cities, device=device).index_add(0, city, h.sum(dim=(1, 2, 3)))
            mu_h = sum_h / (n_c + EPS)
        else:
            mu_h = means[:, 0]
        dev = torch.where(valid, agl_true - mu_h[city].view(-1, 1, 1, 1), zero)
        err = torch.where(valid, pred["agl"].float() - agl_true, zero)
        out["r2_agl"] = per_city_mean_ratio((err * err).sum(dim=(1, 2, 3)), (dev * dev).sum(dim=(1, 2, 3)))
    if "r2_mag" in which:
        angle = batch["angle"].float().view(-1)
        scale = batch["scale"].float().view(-1)
        flow_per_metre = scale.view(-1, 1) * torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)  # (B, 2)
        v_true = h.unsqueeze(1) * flow_per_metre.view(-1, 2, 1, 1, 1)  # (B, 2, 1, H, W)
        xy = pred["xy"].float()
        unit = xy / _norm(xy).view(-1, 1)
        # The magnitude is masked before it multiplies the direction: a non-finite value at a no-data pixel
        # would otherwise reach the direction's gradient as 0·inf.
        mag = torch.where(valid, pred["mag"].float(), zero)
        v_pred = mag.unsqueeze(1) * unit.view(-1, 2, 1, 1, 1)
        mask = valid.unsqueeze(1)
        if city_means is None:
            sum_v = torch.zeros(n_cities, device=device).index_add(0, city, v_true.sum(dim=(1, 2, 3, 4)))
            mu_v = sum_v / (2 * n_c + EPS)
        else:
            mu_v = means[:, 1]
        dev = torch.where(mask, v_true - mu_v[city].view(-1, 1, 1, 1, 1), zero)
        err = torch.where(mask, v_pred - v_true, zero)
        out["r2_mag"] = per_city_mean_ratio((err * err).sum(dim=(1, 2, 3, 4)), (dev * dev).sum(dim=(1, 2, 3, 4)))
    return out


def geopose_loss(
    pred: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    cfg: LossConfig = LossConfig(),
    city_means: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The total loss and each term (all float32 scalars, whatever the autocast precision of ``pred``).

    Returns ``{"total": Σ weight·term, "agl", "mag", "xy", "scale"}`` (the four MSE terms always, so runs of any
    loss compare on them; a term of weight 0 is reported detached and adds nothing) plus every other term of
    :data:`TERMS` whose weight is > 0.

    Args:
        pred: the model's output (``agl``, ``mag``: (B, 1, H, W); ``xy``: (B, 2); ``scale``: (B,)).
        batch: a batch of samples (``agl`` metres with 0 where no data, ``valid``, ``angle``, ``scale``; ``city``
            for the R² terms).
        cfg: the terms' weights and parameters.
        city_means: for the R² terms, per city the damped training-set means ``(μ_h, μ_v)``, shape
            (len(CITIES), 2); ``None`` takes each city's damped means from the batch (see :func:`r2_terms`).
    """
    w = cfg.weights()
    valid = batch["valid"]
    agl_true = batch["agl"].float()
    scale_true = batch["scale"].float()
    angle = batch["angle"].float()
    mag_true = agl_true * scale_true.view(-1, 1, 1, 1)
    xy_true = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)

    def mse_part(term: str) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and w[term] > 0):
            if term == "agl":
                return masked_mse(pred["agl"], agl_true, valid)
            if term == "mag":
                return masked_mse(pred["mag"], mag_true, valid)
            if term == "xy":
                return torch.mean((pred["xy"].float() - xy_true) ** 2)
            return torch.mean((pred["scale"].float() - scale_true) ** 2)

    parts = {term: mse_part(term) for term in MSE_TERMS}
    if w["huber_agl"] > 0:
        parts["huber_agl"] = masked_huber(pred["agl"], agl_true, valid, cfg.huber_delta_agl)
    if w["huber_mag"] > 0:
        parts["huber_mag"] = masked_huber(pred["mag"], mag_true, valid, cfg.huber_delta_mag)
    if w["focal"] > 0:
        parts["focal"] = masked_focal_mse(pred["agl"], agl_true, valid, cfg.focal_beta, cfg.focal_gamma)
    if w["cos"] > 0:
        parts["cos"] = cosine_loss(pred["xy"], xy_true)
    r2 = tuple(term for term in ("r2_agl", "r2_mag") if w[term] > 0)
    if r2:
        parts.update(r2_terms(pred, batch, city_means, r2))
    weighted = [w[term] * parts[term] for term in TERMS if w[term] > 0]
    total = weighted[0]
    for part in weighted[1:]:
        total = total + part
    return {"total": total, **parts}

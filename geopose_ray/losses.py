"""The geopose loss: the baseline's weighted sum, with no-data pixels masked out of the pixel terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (the baseline's defaults)."""

    agl: float = 1.0  # MSE of AGL over valid pixels, m²
    mag: float = 2.0  # MSE of magnitude against AGL·scale over valid pixels, px²
    xy: float = 10.0  # MSE of the direction (x, y) against (sin θ, cos θ)
    scale: float = 10.0  # MSE of the scale, (px/m)²


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean squared error over its valid pixels (0 if it has none); then the batch mean.

    Averaging per sample first makes a batch's loss the mean of its samples' losses, so gradient
    accumulation over micro-batches reproduces the large batch exactly.
    """
    diff = torch.where(valid, pred.float() - target.float(), torch.zeros((), device=pred.device))
    per_sample = (diff * diff).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)
    return per_sample.mean()


def geopose_loss(
    pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weights: LossWeights = LossWeights()
) -> dict[str, torch.Tensor]:
    """The total loss and each component (all scalars).

    Args:
        pred: the model's output (``agl``, ``mag``: (B, 1, H, W); ``xy``: (B, 2); ``scale``: (B,)).
        batch: a batch of samples (``agl`` metres with 0 where no data, ``valid``, ``angle``, ``scale``).
    """
    valid = batch["valid"]
    agl_true = batch["agl"]
    scale_true = batch["scale"].float()
    angle = batch["angle"].float()
    mag_true = agl_true * scale_true.view(-1, 1, 1, 1)
    xy_true = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)
    parts = {
        "agl": masked_mse(pred["agl"], agl_true, valid),
        "mag": masked_mse(pred["mag"], mag_true, valid),
        "xy": torch.mean((pred["xy"].float() - xy_true) ** 2),
        "scale": torch.mean((pred["scale"].float() - scale_true) ** 2),
    }
    total = (
        weights.agl * parts["agl"]
        + weights.mag * parts["mag"]
        + weights.xy * parts["xy"]
        + weights.scale * parts["scale"]
    )
    return {"total": total, **parts}

"""The geopose model: encoder → decoder → AGL and magnitude heads; direction and scale heads.

As in the challenge baseline:

* the decoder's output, brought to the input resolution with ``head_channels`` channels, feeds two linear
  3×3 convolutions: AGL (metres) and flow magnitude (pixels);
* the deepest encoder feature, average-pooled, goes through dropout and a linear layer to the direction
  ``(x, y)`` (not normalised; the angle is ``atan2(x, y)``);
* the scale is parameter-free: per image, the least-squares slope of magnitude on height,
  ``s = Σ(h·m) / (Σ(h·h) + 0.01)``.

Options: ``metadata`` appends gsd and the city one-hot to the pooled feature; ``derived_magnitude`` drops the
magnitude head and learns the scale from the pooled feature instead, with ``magnitude = AGL · scale``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from geopose_ray.data.layout import CITIES
from geopose_ray.errors import ConfigError
from geopose_ray.models.config import ModelConfig, ResolvedModel, resolve_model

SCALE_EPS = 0.01


class GeoposeModel(nn.Module):
    """Geopose heads on an smp architecture. Input: (B, 3, H, W) uint8 RGB (or float in [0, 255]).

    Output: ``{"agl": (B, 1, H, W) metres, "mag": (B, 1, H, W) pixels, "xy": (B, 2), "scale": (B,) px/m}``.
    """

    def __init__(self, cfg: ModelConfig, resolved: ResolvedModel | None = None) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.cfg = cfg
        r = resolved or resolve_model(cfg)
        with warnings.catch_warnings():
            # smp warns when timm weights are asked for with True, which is how a tagged tu- name wants it.
            warnings.filterwarnings("ignore", message="For 'tu-' .*encoders")
            try:
                net = smp.create_model(
                    r.decoder,
                    encoder_name=r.encoder,
                    encoder_weights=r.encoder_weights,
                    classes=cfg.head_channels,
                    **cfg.decoder_kwargs,
                )
            except Exception as e:
                if r.encoder_weights is None:
                    raise
                # Weights come from the Hugging Face hub (smp and timm); offline, or behind a proxy, that fails.
                raise ConfigError(
                    f"could not load `{cfg.weights}` weights for encoder `{cfg.encoder}` ({type(e).__name__}: {e}); "
                    "on a machine without access to the weights hub use weights: null, or fill the hub cache "
                    "(HF_HOME) on a connected machine first"
                ) from e
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.head_features = net.segmentation_head
        self._vit_decoder = r.decoder == "DPT"  # its encoder also returns prefix tokens for the decoder
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(r.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(r.std).view(1, 3, 1, 1) * 255.0, persistent=False)
        deep = int(net.encoder.out_channels[-1]) + (1 + len(CITIES) if cfg.metadata else 0)
        self.agl_head = nn.Conv2d(cfg.head_channels, 1, kernel_size=3, padding=1)
        self.mag_head = None if cfg.derived_magnitude else nn.Conv2d(cfg.head_channels, 1, kernel_size=3, padding=1)
        self.direction_head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(deep, 2))
        self.scale_head = nn.Linear(deep, 1) if cfg.derived_magnitude else None

    def forward(
        self, image: torch.Tensor, gsd: torch.Tensor | None = None, city: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        agl, mag, deep = self.pixel_maps(image)
        return self.global_heads(deep.mean(dim=(2, 3)), gsd, city, agl, mag)

    @property
    def output_stride(self) -> int:
        """The input pixels per cell of the deepest encoder feature."""
        return int(getattr(self.encoder, "output_stride", 32))

    def pixel_maps(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The per-pixel part: AGL (B, 1, H, W), the magnitude head's map (None with ``derived_magnitude``) and
        the deepest encoder feature (B, C, H / stride, W / stride), whose mean the global heads read."""
        x = (image.float() - self.mean) / self.std
        encoded = self.encoder(x)
        if self._vit_decoder:
            features, prefix = encoded
            decoded = self.decoder(features, prefix)
        else:
            features = encoded
            decoded = self.decoder(features)
        f = self.head_features(decoded)
        if f.shape[-2:] != x.shape[-2:]:
            f = F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.agl_head(f), (self.mag_head(f) if self.mag_head is not None else None), features[-1]

    def global_heads(
        self,
        pooled: torch.Tensor,
        gsd: torch.Tensor | None,
        city: torch.Tensor | None,
        agl: torch.Tensor,
        mag: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Direction and scale from the pooled deepest feature (B, C) and the pixel maps: the model's output."""
        if self.cfg.metadata:
            if gsd is None or city is None:
                raise ConfigError("this model was built with metadata=True: pass gsd and city to forward()")
            onehot = F.one_hot(city.long(), len(CITIES)).to(pooled.dtype)
            pooled = torch.cat([pooled, gsd.to(pooled.dtype).view(-1, 1), onehot], dim=1)
        xy = self.direction_head(pooled)
        if self.scale_head is not None:
            scale = self.scale_head(pooled).squeeze(1)
            mag = agl * scale.view(-1, 1, 1, 1)
        else:
            assert mag is not None
            a, m = agl.float(), mag.float()
            scale = (a * m).sum(dim=(1, 2, 3)) / ((a * a).sum(dim=(1, 2, 3)) + SCALE_EPS)
        return {"agl": agl, "mag": mag, "xy": xy, "scale": scale}


def build_model(cfg: ModelConfig) -> GeoposeModel:
    """Build a model; pretrained weights are downloaded (or read from the hub cache) when ``cfg.weights`` is set."""
    return GeoposeModel(cfg)


def validate_model_config(cfg: ModelConfig, image_size: int, batch_size: int = 2) -> list[str]:
    """Check that ``cfg`` builds and trains on (batch_size, 3, image_size, image_size) inputs, without
    allocating weights or downloading anything. Returns notes about resolved names; raises ConfigError with
    the reason when the combination cannot work.
    """
    resolved = resolve_model(cfg)
    dry = ModelConfig(**{**cfg.__dict__, "weights": None})
    dry_resolved = ResolvedModel(
        resolved.decoder, resolved.encoder.split(".")[0], None, resolved.mean, resolved.std, ()
    )
    what = f"{resolved.decoder} with encoder {cfg.encoder}"
    for device in ("meta", "cpu"):
        try:
            with torch.device(device), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = GeoposeModel(dry, dry_resolved)
                stride = int(getattr(model.encoder, "output_stride", 32))
                if image_size % stride:
                    raise ConfigError(
                        f"{what}: image size {image_size} is not divisible by the encoder's output stride {stride}; "
                        f"use a multiple of {stride}"
                    )
                size = image_size if device == "meta" else min(image_size, 128)
                model.train()
                n = max(batch_size, 1)
                model(
                    torch.zeros(n, 3, size, size),
                    torch.ones(n),
                    torch.zeros(n, dtype=torch.long),
                )
            return list(resolved.notes)
        except ConfigError:
            raise
        except (NotImplementedError, RuntimeError) as e:
            if device == "meta" and "meta" in str(e).lower():
                continue  # this encoder cannot run on the meta device; build it for real, small
            raise ConfigError(f"{what} cannot run on {image_size}px inputs with batch {batch_size}: {e}") from e
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason = str(e).strip("'\"")
            if "Expected more than 1 value per channel" in reason:
                reason = (
                    "its pooling branch normalises a 1x1 feature with BatchNorm, which fails at batch size 1 in "
                    "training; use batch >= 2 (accumulate steps for a larger effective batch)"
                )
            raise ConfigError(f"{what} cannot work: {reason}") from e
    return list(resolved.notes)

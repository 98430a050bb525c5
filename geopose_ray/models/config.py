"""The model configuration and name resolution: decoders, encoders, weights, input normalisation.

Names are checked here, before anything is built, and a miss lists the valid choices (with the closest ones
first) so that a sweep with a typo fails in a second, not after its trials start.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from geopose_ray.errors import ConfigError

DECODERS: tuple[str, ...] = (
    "Unet",
    "UnetPlusPlus",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "Linknet",
    "MAnet",
    "PAN",
    "UPerNet",
    "Segformer",
    "DPT",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# smp encoders whose pretrained weights expect inputs scaled to [-1, 1] rather than ImageNet statistics.
_HALF_NORMALISED = ("inceptionv4", "inceptionresnetv2", "xception")
# Old smp names that current smp no longer ships; they live on as timm universal ("tu-") encoders.
_TIMM_PREFIXES = ("timm-regnet", "timm-res2", "timm-resnest", "timm-mobilenetv3", "timm-gernet")


@dataclass(frozen=True)
class ModelConfig:
    """What model to build."""

    decoder: str = "Unet"  # a segmentation-models-pytorch architecture, see DECODERS
    encoder: str = "resnet34"  # an smp encoder name, or "tu-<timm model>" for any timm model
    weights: str | None = None  # "imagenet", "swsl", ... as the encoder offers; None = random init
    metadata: bool = False  # feed gsd and the city one-hot into the direction (and learned scale) head
    derived_magnitude: bool = False  # magnitude = AGL × a learned per-image scale, instead of its own head
    head_channels: int = 16  # channels of the decoder output that the AGL and magnitude heads read
    dropout: float = 0.5  # before the direction head's linear layer
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the smp architecture


@dataclass(frozen=True)
class ResolvedModel:
    """A config with names resolved to what smp and timm accept."""

    decoder: str
    encoder: str  # possibly "tu-<model>.<pretrained tag>"
    encoder_weights: str | bool | None  # what smp's create_model takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    notes: tuple[str, ...]  # what was changed and why, for the log


def _choices(value: str, options: list[str], limit: int = 12) -> str:
    close = difflib.get_close_matches(value, options, n=5, cutoff=0.5)
    rest = [o for o in options if o not in close]
    shown = close + rest[: max(0, limit - len(close))]
    more = len(options) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def resolve_decoder(name: str) -> str:
    """The canonical smp architecture name (case-insensitive)."""
    by_lower = {d.lower(): d for d in DECODERS}
    if name.lower() not in by_lower:
        raise ConfigError(f"Wrong decoder `{name}`, supported decoders: [{_choices(name, list(DECODERS))}]")
    return by_lower[name.lower()]


def smp_encoder_names() -> list[str]:
    import segmentation_models_pytorch as smp

    return list(smp.encoders.get_encoder_names())


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Check and resolve the decoder, encoder and weights names of ``cfg``."""
    import timm

    decoder = resolve_decoder(cfg.decoder)
    notes: list[str] = []
    encoder = cfg.encoder
    if encoder.startswith(_TIMM_PREFIXES):
        new = encoder.replace("timm-", "tu-tf_" if "mobilenetv3" in encoder else "tu-", 1)
        notes.append(f"encoder `{encoder}` is gone from segmentation-models-pytorch; using timm's `{new}`")
        encoder = new
    weights = None if cfg.weights in (None, "", "none", "None") else cfg.weights
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if encoder.startswith("tu-"):
        base = encoder[3:].split(".")[0]
        if not timm.is_model(base):
            raise ConfigError(
                f"Wrong encoder `{encoder}`: timm has no model `{base}`; "
                f"close timm models: [{_choices(base, timm.list_models(), limit=8)}]"
            )
        encoder_weights: str | bool | None = None
        if weights is not None:
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
            if not tags:
                raise ConfigError(f"Wrong weights `{weights}` for `{encoder}`: timm has no pretrained weights for it")
            if weights == "imagenet":
                tag = tags[0]
            else:
                matching = [t for t in tags if weights == t or weights in t.split("_")]
                if not matching:
                    raise ConfigError(
                        f"Wrong weights `{weights}` for encoder `{encoder}`. Available options are: "
                        f"['imagenet', {', '.join(repr(t) for t in tags)}]"
                    )
                tag = matching[0]
            encoder = f"tu-{base}.{tag}"
            encoder_weights = True
            pcfg = timm.get_pretrained_cfg(f"{base}.{tag}")
        else:
            pcfg = timm.get_pretrained_cfg(base)
        if pcfg is not None:
            mean, std = tuple(pcfg.mean), tuple(pcfg.std)  # type: ignore[assignment]
    else:
        names = smp_encoder_names()
        if encoder not in names:
            raise ConfigError(
                f"Wrong encoder name `{encoder}`, supported encoders: [{_choices(encoder, names)}], "
                "or any timm model as `tu-<name>`"
            )
        import segmentation_models_pytorch as smp

        available = list(smp.encoders.encoders[encoder]["pretrained_settings"])
        if weights is not None and weights not in available:
            raise ConfigError(
                f"Wrong pretrained weights `{weights}` for encoder `{encoder}`. Available options are: "
                f"{[*available, None]}"
            )
        encoder_weights = weights
        if encoder.startswith(_HALF_NORMALISED):
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if cfg.head_channels < 1:
        raise ConfigError(f"The value of `head_channels` is {cfg.head_channels}, but must be `head_channels >= 1`")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"The value of `dropout` is {cfg.dropout}, but must be `0 <= dropout < 1`")
    return ResolvedModel(decoder, encoder, encoder_weights, mean, std, tuple(notes))

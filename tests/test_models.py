"""The model zoo: every decoder with tiny encoders, the geopose heads, and config validation up front."""

from __future__ import annotations

import pytest
import torch

from geopose_ray.errors import ConfigError
from geopose_ray.losses import LossWeights, geopose_loss, masked_mse
from geopose_ray.models import GeoposeModel, ModelConfig, build_model, validate_model_config
from geopose_ray.models.config import DECODERS, resolve_model

# Tiny encoders that every decoder accepts (ViT-style encoders only work with DPT).
ENCODER_FOR = {d: "tu-test_resnet" for d in DECODERS} | {"DPT": "tu-test_vit"}
SIZE = {d: 64 for d in DECODERS} | {"PAN": 128}  # PAN pools down to 1x1 below 128 px


def _inputs(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    return image, torch.full((n,), 0.4), torch.arange(n) % 4


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_gives_full_resolution_heads(decoder: str) -> None:
    cfg = ModelConfig(decoder=decoder, encoder=ENCODER_FOR[decoder])
    size = SIZE[decoder]
    assert validate_model_config(cfg, size, batch_size=2) == []
    model = build_model(cfg).eval()
    out = model(*_inputs(2, size))
    assert out["agl"].shape == (2, 1, size, size) and out["mag"].shape == (2, 1, size, size)
    assert out["xy"].shape == (2, 2) and out["scale"].shape == (2,)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_scale_head_is_the_least_squares_slope() -> None:
    model = build_model(ModelConfig(encoder="tu-test_resnet")).eval()
    out = model(*_inputs(2, 64))
    a, m = out["agl"].double(), out["mag"].double()
    expected = (a * m).sum(dim=(1, 2, 3)) / ((a * a).sum(dim=(1, 2, 3)) + 0.01)
    torch.testing.assert_close(out["scale"].double(), expected, rtol=1e-5, atol=1e-7)


def test_derived_magnitude_and_metadata_options() -> None:
    model = build_model(ModelConfig(encoder="tu-test_resnet", derived_magnitude=True, metadata=True)).eval()
    assert model.mag_head is None and model.scale_head is not None
    image, gsd, city = _inputs(2, 64)
    out = model(image, gsd, city)
    torch.testing.assert_close(out["mag"], out["agl"] * out["scale"].view(-1, 1, 1, 1))
    other_city = model(image, gsd, (city + 1) % 4)
    assert not torch.allclose(out["xy"], other_city["xy"])  # the city reaches the direction head
    with pytest.raises(ConfigError, match="metadata=True: pass gsd and city"):
        model(image)


def test_input_normalisation_follows_the_encoder() -> None:
    assert resolve_model(ModelConfig(encoder="resnet34")).mean == (0.485, 0.456, 0.406)
    assert resolve_model(ModelConfig(encoder="inceptionv4")).mean == (0.5, 0.5, 0.5)


def test_seed_names_resolve() -> None:
    """The seed's encoders, including the removed timm-regnetx_064 and SWSL weights."""
    r = resolve_model(ModelConfig(encoder="timm-regnetx_064"))
    assert r.encoder == "tu-regnetx_064" and "timm's `tu-regnetx_064`" in r.notes[0]
    assert resolve_model(ModelConfig(encoder="resnext50_32x4d", weights="swsl")).encoder_weights == "swsl"
    tu = resolve_model(ModelConfig(encoder="tu-resnext50_32x4d", weights="swsl"))
    assert tu.encoder == "tu-resnext50_32x4d.fb_swsl_ig1b_ft_in1k" and tu.encoder_weights is True
    for enc in ("resnet34", "efficientnet-b0", "inceptionv4", "se_resnext50_32x4d"):
        assert resolve_model(ModelConfig(encoder=enc, weights="imagenet")).encoder_weights == "imagenet"


@pytest.mark.parametrize(
    ("cfg", "size", "batch", "message"),
    [
        (ModelConfig(decoder="Unett"), 64, 2, r"Wrong decoder `Unett`, supported decoders: \[Unet,"),
        (ModelConfig(encoder="resnet343"), 64, 2, r"Wrong encoder name `resnet343`, supported encoders: \[resnet34,"),
        (ModelConfig(encoder="tu-nonexistent_net"), 64, 2, "timm has no model `nonexistent_net`"),
        (ModelConfig(encoder="resnet18", weights="swl"), 64, 2, r"Available options are: \['imagenet', 'ssl', 'swsl'"),
        (ModelConfig(encoder="tu-convnext_atto_rms", weights="imagenet"), 64, 2, "timm has no pretrained weights"),
        (ModelConfig(encoder="tu-test_resnet"), 100, 2, "not divisible by the encoder's output stride 32"),
        (ModelConfig(decoder="DPT", encoder="resnet18"), 64, 2, "Only Timm encoders are supported for DPT"),
        (ModelConfig(decoder="Unet", encoder="tu-test_vit"), 64, 2, "downsampling pattern"),
        (ModelConfig(decoder="DeepLabV3", encoder="tu-test_resnet"), 64, 1, "fails at batch size 1 in training"),
        (ModelConfig(dropout=1.0, encoder="tu-test_resnet"), 64, 2, "`dropout` is 1.0"),
    ],
)
def test_impossible_combinations_fail_at_validation(cfg: ModelConfig, size: int, batch: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_model_config(cfg, size, batch)


def test_validation_allocates_no_weights_and_is_fast() -> None:
    """A ResNet-50 U-Net at 1024 px validates on the meta device: no 100 MB of weights, no forward pass cost."""
    import time

    start = time.perf_counter()
    validate_model_config(ModelConfig(encoder="resnext50_32x4d", weights="swsl"), 1024, batch_size=4)
    assert time.perf_counter() - start < 5.0


def test_asking_for_pretrained_weights_tries_to_download_and_fails_offline() -> None:
    """The real weight-loading path is kept; here the network is closed, so it must fail, not fall back silently."""
    with pytest.raises(ConfigError, match=r"could not load `imagenet` weights for encoder `resnet18`.*weights: null"):
        GeoposeModel(ModelConfig(encoder="resnet18", weights="imagenet"))


def test_loss_masks_no_data_and_returns_every_part() -> None:
    torch.manual_seed(0)
    valid = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    valid[0, :, :2] = False
    batch = {
        "agl": torch.rand(2, 1, 4, 4) * 10,
        "valid": valid,
        "angle": torch.tensor([0.0, 1.0]),
        "scale": torch.tensor([0.5, 0.25]),
    }
    pred = {
        "agl": batch["agl"].clone(),
        "mag": batch["agl"] * batch["scale"].view(-1, 1, 1, 1),
        "xy": torch.stack([torch.sin(batch["angle"]), torch.cos(batch["angle"])], 1),
        "scale": batch["scale"],
    }
    pred["agl"][0, :, :2] = 1000.0  # wrong, but only where there is no data
    parts = geopose_loss(pred, batch)
    assert set(parts) == {"total", "agl", "mag", "xy", "scale"}
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in parts.values())
    pred["agl"] = pred["agl"] + 1.0
    pred["xy"] = pred["xy"] + 0.5
    parts = geopose_loss(pred, batch, LossWeights(agl=2.0, mag=0.0, xy=1.0, scale=0.0))
    assert float(parts["agl"]) == pytest.approx(1.0) and float(parts["xy"]) == pytest.approx(0.25)
    assert float(parts["total"]) == pytest.approx(2.0 * 1.0 + 1.0 * 0.25)
    # Per-sample means: a sample with few valid pixels weighs as much as one with many.
    one = masked_mse(
        torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([[[[1, 0], [0, 0]]], [[[1, 1], [1, 1]]]]).bool()
    )
    assert float(one) == pytest.approx(1.0)

"""Prediction and test-time augmentation: outputs are mapped back to the original frame correctly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from geopose_ray.cli import main
from geopose_ray.data.layout import read_vflow, scan_dir
from geopose_ray.engine.predict import Transform, predict_batch, tta_transforms
from geopose_ray.errors import ConfigError
from geopose_ray.scoring import score_dirs


class Equivariant(nn.Module):
    """Heights = the red channel; direction = from the image centre to the red-weighted centroid (x = columns,
    y = rows). Both follow any rotation or flip of the input exactly as real labels do."""

    def forward(self, image: torch.Tensor, gsd: Any = None, city: Any = None) -> dict[str, torch.Tensor]:
        red = image[:, 0].float()
        h, w = red.shape[-2:]
        rows = torch.arange(h, dtype=torch.float32).view(1, h, 1) - (h - 1) / 2
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, w) - (w - 1) / 2
        total = red.sum(dim=(1, 2))
        xy = torch.stack([(red * cols).sum(dim=(1, 2)) / total, (red * rows).sum(dim=(1, 2)) / total], dim=1)
        return {"agl": red[:, None], "mag": red[:, None], "xy": xy, "scale": torch.full((image.shape[0],), 0.5)}


def test_transform_inverse_round_trips() -> None:
    x = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)
    for t in tta_transforms("d4"):
        assert torch.equal(t.invert(t.apply(x)), x)
    assert len(tta_transforms("d4")) == 8 and len(tta_transforms("flip")) == 3
    with pytest.raises(ConfigError, match="`tta` is 'd8'"):
        tta_transforms("d8")


@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_tta_maps_heights_and_angles_back(mode: str) -> None:
    """With a model that is exactly equivariant, every TTA member agrees with the plain prediction, so the
    average must equal it; a wrong inverse (angle sign, rotation direction) would pull it away."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    image[:, 0, 2:6, 9:14] = 255  # an off-centre bright blob, so the direction is well defined
    args = (torch.ones(3), torch.zeros(3, dtype=torch.long))
    agl0, scale0, angle0 = predict_batch(Equivariant(), image, *args, tta="none")
    agl, scale, angle = predict_batch(Equivariant(), image, *args, tta=mode)
    np.testing.assert_allclose(agl, agl0, rtol=1e-6)
    np.testing.assert_allclose(scale, scale0)
    np.testing.assert_allclose(np.cos(angle - angle0), 1.0, atol=1e-9)
    for t in tta_transforms("d4"):  # and each member on its own
        out = Equivariant()(t.apply(image))
        back = t.invert_angle(torch.atan2(out["xy"][:, 0], out["xy"][:, 1])).numpy()
        np.testing.assert_allclose(np.cos(back - angle0), 1.0, atol=1e-9)
    assert not np.allclose(Transform(1).invert_angle(torch.tensor(angle0)).numpy(), angle0)


@pytest.fixture
def checkpoint(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / "last.pt"


def test_predict_writes_a_complete_submission_at_full_size(checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    assert main(["predict", str(checkpoint), "--test", str(dataset / "test"), "--out", str(sub), "--tta", "d4"]) == 0
    assert set(scan_dir(sub)) == set(scan_dir(dataset / "test"))
    report = score_dirs(dataset / "test_truth", sub, workers=1)
    assert math.isfinite(report.score) and not any(c.failures for c in report.cities.values())
    scale, angle = read_vflow(next(sub.glob("*_VFLOW.json")))
    assert math.isfinite(scale) and 0 <= angle < 2 * math.pi


def test_predict_refuses_a_missing_checkpoint(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", str(tmp_path / "none.pt"), "--test", str(dataset / "test"), "--out", str(tmp_path / "s")])
    assert code == 2 and "none.pt: checkpoint not found" in capsys.readouterr().err

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


def test_predict_reads_the_data_root_metadata(
    checkpoint: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The competition's layout: test/ without a metadata.csv, the root's (bare ids) beside it."""
    from data_root import data_root

    root = data_root(dataset, tmp_path / "root", ("test",))
    sub = tmp_path / "sub"
    assert main(["predict", str(checkpoint), "--test", str(root / "test"), "--out", str(sub)]) == 0
    assert set(scan_dir(sub)) == set(scan_dir(dataset / "test"))


class _GsdRecorder(Equivariant):
    """Equivariant, recording the gsd each batch is given."""

    def __init__(self) -> None:
        super().__init__()
        self.gsd: list[float] = []

    def forward(self, image: torch.Tensor, gsd: Any = None, city: Any = None) -> dict[str, torch.Tensor]:
        self.gsd += [float(g) for g in gsd]
        return super().forward(image, gsd, city)


def test_a_model_that_uses_gsd_gets_it_or_is_refused_up_front(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from data_root import data_root

    import geopose_ray.engine.predict as predict
    from geopose_ray.data.layout import lookup_metadata, read_metadata

    model = _GsdRecorder()
    monkeypatch.setattr(
        predict, "load_model", lambda ckpt, dev: (model, SimpleNamespace(model=SimpleNamespace(metadata=True)), 2)
    )
    root = data_root(dataset, tmp_path / "root", ("test",))
    stems = sorted(scan_dir(root / "test"))
    meta = read_metadata(root / "metadata.csv")
    assert predict.predict_dir("model.pt", root / "test", tmp_path / "sub", batch_size=1) == len(stems)
    assert model.gsd == pytest.approx([getattr(lookup_metadata(meta, s), "gsd", None) for s in stems])
    # Two tiles without a usable gsd: one line naming the file, the count and the tiles, before any prediction.
    lines = (root / "metadata.csv").read_text().splitlines()
    bare = [s.split("_")[1] for s in stems[:2]]
    broken = [ln for ln in lines if ln.split(",")[0] != bare[0]]
    broken = [ln if ln.split(",")[0] != bare[1] else ln.rsplit(",", 1)[0] + ",nan" for ln in broken]
    elsewhere = tmp_path / "meta.csv"
    elsewhere.write_text("\n".join(broken) + "\n")
    model.gsd.clear()
    argv = [
        "predict",
        "model.pt",
        "--test",
        str(root / "test"),
        "--out",
        str(tmp_path / "s2"),
        "--metadata",
        str(elsewhere),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"geopose-ray predict: error: {elsewhere}: 2 of {len(stems)} tile(s)"
    )
    assert f"({stems[0]}, {stems[1]})" in err and "this model (it uses gsd) needs it" in err
    assert model.gsd == [] and not (tmp_path / "s2").exists()
    (root / "metadata.csv").unlink()
    assert main(argv[:-2]) == 2
    assert "no metadata.csv beside the tiles or at the data root" in capsys.readouterr().err

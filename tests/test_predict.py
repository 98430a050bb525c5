"""Prediction and test-time augmentation: outputs are mapped back to the original frame correctly."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from geopose_ray.cli import main
from geopose_ray.data.layout import read_vflow, scan_dir
from geopose_ray.engine.predict import Transform, predict_batch, tta_transforms, window_spans, windowed_forward
from geopose_ray.errors import ConfigError
from geopose_ray.models.config import ModelConfig
from geopose_ray.models.geopose import GeoposeModel
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
    assert len(tta_transforms("d4")) == 8
    # flip: identity, columns reversed, rows reversed, both: four distinct views, each its own inverse
    flips = tta_transforms("flip")
    views = [t.apply(x) for t in flips]
    assert views[0].equal(x) and views[1].equal(x.flip(-1)) and views[2].equal(x.flip(-2))
    assert views[3].equal(x.flip(-1).flip(-2)) and len({v.numpy().tobytes() for v in views}) == 4
    assert all(t.apply(t.apply(x)).equal(x) for t in flips)
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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("case", ["truth dir", "train dir", "test dir", "earlier submission", "unwritable"])
def test_predict_refuses_an_output_it_would_damage_before_any_inference(
    checkpoint: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Into a folder of labels (the truth, a training split) or of images, over files of an earlier submission
    (without --overwrite), or where it cannot write (below a file: the tests run as root, whom a read-only
    directory does not stop): one line, exit 2, and no file changed."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    out = {"truth dir": data / "test_truth", "train dir": data / "train", "test dir": data / "test",
           "earlier submission": tmp_path / "sub", "unwritable": tmp_path / "a-file" / "sub"}[case]  # fmt: skip
    args = ["predict", str(checkpoint), "--test", str(data / "test"), "--out", str(out)]
    if case == "earlier submission":
        assert main(args) == 0
        capsys.readouterr()
    if case == "unwritable":
        (tmp_path / "a-file").write_text("not a directory")
    before = _tree(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    message = {"truth dir": "this would write over", "train dir": "holds a dataset's images",
               "test dir": "holds a dataset's images", "earlier submission": "--overwrite to replace them",
               "unwritable": "cannot write the submission there"}[case]  # fmt: skip
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path) == before
    if case == "earlier submission":
        assert main([*args, "--overwrite"]) == 0


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


class SmallField(GeoposeModel):
    """A geopose model whose pixel maps see 5×5 pixels and whose deepest feature is the 32² block mean of a
    pixel-wise map: windows with enough overlap must reproduce its one-pass output exactly."""

    def __init__(self, metadata: bool = False) -> None:
        super().__init__(ModelConfig(encoder="tu-test_resnet", metadata=metadata))
        channels = int(self.encoder.out_channels[-1])
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1))
        self.deep = nn.Conv2d(8, channels, 1)

    def pixel_maps(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        f = self.body(image.float() / 255)
        return f[:, :1], f[:, 1:2], nn.functional.avg_pool2d(self.deep(f), 32)


def test_window_spans_tile_the_axis() -> None:
    for size, window, overlap in ((256, 128, 64), (2048, 1024, 128), (320, 128, 32), (96, 128, 32)):
        spans = window_spans(size, window, overlap, 32)
        assert spans[0][:2] == (0, 0) and spans[-1][2] == size and spans[-1][0] + min(window, size) == size
        assert all(a[2] == b[1] for a, b in itertools.pairwise(spans))  # cores tile the axis
        assert all(s % 32 == 0 and c0 % 32 == 0 and s <= c0 < c1 <= s + window for s, c0, c1 in spans)


@pytest.mark.parametrize("metadata", [False, True])
def test_windows_equal_one_pass_when_the_receptive_field_fits(metadata: bool) -> None:
    torch.manual_seed(0)
    model = SmallField(metadata).eval()
    image = torch.randint(0, 255, (2, 3, 256, 192), dtype=torch.uint8)
    gsd, city = torch.tensor([0.3, 0.5]), torch.tensor([0, 2])
    with torch.no_grad():
        whole = model(image, gsd, city)
        windowed = windowed_forward(model, image, gsd, city, window=128, overlap=64)
    for key in ("agl", "mag", "xy", "scale"):
        torch.testing.assert_close(windowed[key], whole[key], rtol=1e-5, atol=1e-5)
    agl0, scale0, angle0 = predict_batch(model, image, gsd, city, "flip")
    agl1, scale1, angle1 = predict_batch(model, image, gsd, city, "flip", window=128, overlap=64)
    np.testing.assert_allclose(agl1, agl0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scale1, scale0, rtol=1e-5)
    np.testing.assert_allclose(np.cos(angle1 - angle0), 1.0, atol=1e-5)  # the angle within 0.3°


def test_windows_of_a_real_model_are_close_and_a_large_window_is_one_pass() -> None:
    torch.manual_seed(0)
    model = GeoposeModel(ModelConfig(encoder="tu-test_resnet")).eval()
    image = torch.randint(0, 255, (1, 3, 256, 256), dtype=torch.uint8)
    args = (torch.ones(1), torch.zeros(1, dtype=torch.long))
    agl0, scale0, _ = predict_batch(model, image, *args)
    same = predict_batch(model, image, *args, window=256)
    assert np.array_equal(same[0], agl0) and np.array_equal(same[1], scale0)
    agl1, _, _ = predict_batch(model, image, *args, window=128, overlap=64)
    assert agl1.shape == agl0.shape and np.isfinite(agl1).all()
    assert np.abs(agl1 - agl0).mean() < 0.5 * np.abs(agl0).mean() + 1e-3  # close, not equal: its field is wider
    with pytest.raises(ConfigError, match="multiples of the encoder's output stride 32"):
        windowed_forward(model, image, *args, window=100, overlap=20)

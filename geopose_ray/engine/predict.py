"""Prediction: a checkpoint → a submission directory, with optional flip / rot90 test-time augmentation.

Under a transform T of the input (k quarter turns counter-clockwise, then optionally the columns reversed),
the model predicts in T's frame; AGL is mapped back by T⁻¹ and the angle by θ = T⁻¹(θ_T):
a quarter turn adds π/2 to θ and reversing the columns negates it (see ``geopose_ray.data.augment``).
AGL and scale are averaged; angles are averaged on the circle.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from geopose_ray.data.cache import downsample_rgb
from geopose_ray.data.layout import (
    AGL_SUFFIX,
    CITIES,
    VFLOW_SUFFIX,
    city_of,
    locate_metadata,
    lookup_metadata,
    read_metadata,
    require_gsd,
    scan_dir,
)
from geopose_ray.data.rasters import read_rgb
from geopose_ray.data.submission import check_submission, write_prediction
from geopose_ray.engine.checkpoint import load_checkpoint
from geopose_ray.engine.config import TrainConfig
from geopose_ray.engine.trainer import resolve_device
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.geometry import direction_to_angle
from geopose_ray.models.geopose import GeoposeModel

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip", "d4")


@dataclass(frozen=True)
class Transform:
    """k quarter turns counter-clockwise, then the columns reversed if ``flip``."""

    k: int = 0
    flip: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform images or maps (..., H, W)."""
        x = torch.rot90(x, self.k, dims=(-2, -1))
        return x.flip(-1) if self.flip else x

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Map (..., H, W) from the transformed frame back."""
        x = x.flip(-1) if self.flip else x
        return torch.rot90(x, -self.k, dims=(-2, -1))

    def invert_angle(self, angle: torch.Tensor) -> torch.Tensor:
        """θ from θ_T = flip(θ + kπ/2), where flip negates."""
        a = -angle if self.flip else angle
        return a - self.k * math.pi / 2


def tta_transforms(mode: str) -> list[Transform]:
    if mode == "none":
        return [Transform()]
    if mode == "flip":  # identity, columns reversed, rows reversed (a half turn, then columns), both (a half turn)
        return [Transform(), Transform(0, True), Transform(2, True), Transform(2)]
    if mode == "d4":
        return [Transform(k, f) for k in range(4) for f in (False, True)]
    raise ConfigError(f"The value of `tta` is {mode!r}, but must be one of {list(TTA_MODES)}")


WINDOW_SIZES = (1024, 768, 512)  # tried in turn, below the tile's side, when one pass runs out of memory
DEFAULT_OVERLAP = 128


def window_spans(size: int, window: int, overlap: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows along one axis of ``size`` pixels: (start, core_start, core_end) each. Starts are multiples of
    ``stride`` at most ``window − overlap`` apart, the last window pushed back inside; the cores (where a window's
    deepest features count) tile the axis exactly, split at stride-aligned points inside the overlaps."""
    if window >= size:
        return [(0, 0, size)]
    step = max(stride, (window - overlap) // stride * stride)
    starts = [*range(0, size - window, step), size - window]
    bounds = [0] + [((starts[i] + window + starts[i + 1]) // 2) // stride * stride for i in range(len(starts) - 1)]
    bounds.append(size)
    return [(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def _ramp(size: int, window: int, start: int, overlap: int) -> torch.Tensor:
    """A window's blending weight along one axis. At an edge that is not the tile's own, the first quarter of the
    overlap gets (almost) no weight, as the pixels whose receptive field the window cuts off; the weight then
    rises linearly to 1 at half the overlap, where the neighbouring window's weight is already 1."""
    x = torch.arange(window, dtype=torch.float32) + 0.5
    w = torch.ones(window)
    q = overlap / 4
    if q > 0:
        if start > 0:
            w = torch.minimum(w, ((x - q) / q).clamp(min=1e-6))
        if start + window < size:
            w = torch.minimum(w, ((window - x - q) / q).clamp(min=1e-6))
    return w


def windowed_forward(
    model: nn.Module, image: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor, window: int, overlap: int
) -> dict[str, torch.Tensor]:
    """The model's output for (B, 3, H, W) images computed in overlapping ``window``² windows.

    The AGL and magnitude maps are blended with weights that ramp across the overlaps; the direction (and a
    learned scale) comes from the deepest encoder feature averaged over the whole tile, each feature cell counted
    once (from the window whose core holds it); the least-squares scale is computed from the blended maps. Where
    the model's receptive field fits in a quarter of the overlap, this equals the one-pass output within float
    tolerance.
    """
    if not isinstance(model, GeoposeModel):
        raise ConfigError("windowed prediction needs a geopose model (pixel_maps and global_heads)")
    stride = int(getattr(model, "output_stride", 32))
    if window % stride or overlap % stride or overlap >= window:
        raise ConfigError(
            f"The value of `window` is {window} and `overlap` {overlap}, but both must be multiples of the encoder's "
            f"output stride {stride}, with overlap < window"
        )
    b, _, h, w = image.shape
    rows, cols = window_spans(h, window, overlap, stride), window_spans(w, window, overlap, stride)
    agl = torch.zeros(b, 1, h, w, device=image.device)
    mag: torch.Tensor | None = None
    weight = torch.zeros(1, 1, h, w, device=image.device)
    pooled: torch.Tensor | None = None
    cells = 0
    for r0, rc0, rc1 in rows:
        rh = min(window, h)
        for c0, cc0, cc1 in cols:
            cw = min(window, w)
            a, m, deep = model.pixel_maps(image[..., r0 : r0 + rh, c0 : c0 + cw])
            wt = (_ramp(h, rh, r0, overlap)[:, None] * _ramp(w, cw, c0, overlap)[None, :]).to(image.device)
            agl[..., r0 : r0 + rh, c0 : c0 + cw] += a.float() * wt
            if m is not None:
                if mag is None:
                    mag = torch.zeros_like(agl)
                mag[..., r0 : r0 + rh, c0 : c0 + cw] += m.float() * wt
            weight[..., r0 : r0 + rh, c0 : c0 + cw] += wt
            core = deep[..., (rc0 - r0) // stride : (rc1 - r0) // stride, (cc0 - c0) // stride : (cc1 - c0) // stride]
            total = core.float().sum(dim=(2, 3))
            pooled = total if pooled is None else pooled + total
            cells += core.shape[-2] * core.shape[-1]
    assert pooled is not None
    agl = agl / weight
    mag = mag / weight if mag is not None else None
    return model.global_heads((pooled / cells).to(image.dtype if image.is_floating_point() else torch.float32),
                              gsd, city, agl, mag)  # fmt: skip


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    image: torch.Tensor,
    gsd: torch.Tensor,
    city: torch.Tensor,
    tta: str = "none",
    window: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
    """Predict (B, 3, H, W) uint8 images: AGL (B, H, W) metres, scale (B,) px/m, angle (B,) radians.

    ``window``: predict in overlapping windows of this side (see :func:`windowed_forward`), each TTA view
    windowed; None, or a window as large as the tile, is one pass."""
    transforms = tta_transforms(tta)
    agl = torch.zeros(image.shape[0], image.shape[-2], image.shape[-1], device=image.device)
    scale = torch.zeros(image.shape[0], device=image.device)
    sin = torch.zeros_like(scale)
    cos = torch.zeros_like(scale)
    for t in transforms:
        view = t.apply(image)
        if window is None or window >= max(image.shape[-2:]):
            out = model(view, gsd, city)
        else:
            out = windowed_forward(model, view, gsd, city, window, overlap)
        agl += t.invert(out["agl"].float()[:, 0])
        scale += out["scale"].float()
        theta = t.invert_angle(torch.atan2(out["xy"][:, 0].float(), out["xy"][:, 1].float()))
        sin += torch.sin(theta)
        cos += torch.cos(theta)
    n = len(transforms)
    angle = direction_to_angle(sin.cpu().numpy(), cos.cpu().numpy())
    return (agl / n).cpu().numpy(), (scale / n).cpu().numpy().astype(np.float64), angle


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[GeoposeModel, TrainConfig, int]:
    """The model of a checkpoint, its training config and the cache's downsample factor."""
    state = load_checkpoint(checkpoint, device)
    cfg = TrainConfig.from_dict(state["config"])
    model = GeoposeModel(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, int(state["downsample"])


def check_output_dir(out_dir: Path, test_dir: Path, stems: list[str], overwrite: bool = False) -> None:
    """A submission directory fit to write ``stems``' predictions into, checked before any work.

    Raises:
        DataError: ``out_dir`` is the test directory or holds images (``*_RGB.*``: a dataset, whose labels the
            submission's files would replace); it holds files this would write over and ``overwrite`` is not
            set; or it cannot be created or written.
    """
    if out_dir.resolve() == test_dir.resolve() or (out_dir.is_dir() and any(out_dir.glob("*_RGB.*"))):
        raise DataError(f"{out_dir}: holds a dataset's images; write the submission to a directory of its own (--out)")
    clash = [out_dir / n for s in stems for n in (f"{s}{AGL_SUFFIX}", f"{s}{VFLOW_SUFFIX}") if (out_dir / n).exists()]
    if clash and not overwrite:
        raise DataError(
            f"{out_dir}: holds {len(clash)} file(s) this would write over (as {clash[0].name}); give a new --out, "
            "or --overwrite to replace them"
        )
    probe = out_dir  # the directory itself, or the nearest one above it that exists (nothing is created here)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is a file")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-check-"):
            pass
    except OSError as e:
        raise DataError(
            f"{out_dir}: cannot write the submission there ({e.strerror or e}); give a writable --out"
        ) from e


def predict_dir(
    checkpoint: str | Path,
    test_dir: str | Path,
    out_dir: str | Path,
    tta: str = "none",
    batch_size: int = 4,
    device: str = "auto",
    metadata: str | Path | None = None,
    window: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    overwrite: bool = False,
) -> int:
    """Predict every test tile of ``test_dir`` into a submission at ``out_dir``; returns the tile count. Refused
    before any inference (:func:`check_output_dir`): an output directory that holds a dataset's images, or, unless
    ``overwrite``, files this would write over, or one that cannot be written.

    ``window``/``overlap``: predict in overlapping windows (:func:`windowed_forward`); by default one pass, and
    windows of the largest of WINDOW_SIZES below the tile's side if one pass runs out of device memory.

    ``metadata``: the metadata.csv with the tiles' gsd (``--metadata``); default the one beside the tiles, else
    the data root's above them (:func:`~geopose_ray.data.layout.locate_metadata`). A model that uses gsd is
    refused, before any tile is predicted, when a test tile has no finite gsd > 0.
    """
    test_dir, out_dir = Path(test_dir), Path(out_dir)
    tta_transforms(tta)  # validate before loading anything
    stems = sorted(s for s, f in scan_dir(test_dir).items() if f.rgb)
    if not stems:
        raise DataError(f"{test_dir}: no test tiles (*_RGB.j2k or *_RGB.tif) to predict")
    check_output_dir(out_dir, test_dir, stems, overwrite)
    meta_path = locate_metadata(test_dir, metadata)
    meta = read_metadata(meta_path) if meta_path is not None else {}
    dev = resolve_device(device)
    model, cfg, k = load_model(checkpoint, dev)
    if cfg.model.metadata:
        require_gsd(meta_path, meta, stems, test_dir, "this model (it uses gsd)")
    files = scan_dir(test_dir)
    for start in range(0, len(stems), batch_size):
        chunk = stems[start : start + batch_size]
        images, shapes, gsds, cities = [], [], [], []
        for stem in chunk:
            rgb = read_rgb(files[stem].rgb[0])
            if rgb.shape[0] % k or rgb.shape[1] % k:
                raise DataError(f"{files[stem].rgb[0]}: size {rgb.shape[1]}x{rgb.shape[0]} is not divisible by {k}")
            shapes.append(rgb.shape[:2])
            images.append(torch.from_numpy(downsample_rgb(rgb, k).transpose(2, 0, 1).copy()))
            row = lookup_metadata(meta, stem)
            gsds.append(row.gsd if row is not None else math.nan)
            cities.append(CITIES.index(city_of(stem)))
        if len({tuple(i.shape) for i in images}) > 1:
            raise DataError(f"{test_dir}: test tiles of different sizes in one batch; use --batch-size 1")
        batch = torch.stack(images).to(dev)
        g, c = torch.tensor(gsds, device=dev), torch.tensor(cities, device=dev)
        try:
            agl, scale, angle = predict_batch(model, batch, g, c, tta, window, overlap)
        except torch.OutOfMemoryError:
            side = max(batch.shape[-2:])
            smaller = [s for s in WINDOW_SIZES if s < min(side, window or side)]
            if not smaller:
                raise
            window = smaller[0]
            log.warning("one pass over %d² tiles ran out of memory; predicting in %d² windows", side, window)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            agl, scale, angle = predict_batch(model, batch, g, c, tta, window, min(overlap, window // 2))
        for j, stem in enumerate(chunk):
            write_prediction(out_dir, stem, agl[j], float(scale[j]), float(angle[j]), full_shape=shapes[j])
    problems = check_submission(out_dir, test_dir)
    if problems:
        raise DataError(f"{out_dir}: the written submission is incomplete: {problems[0]}")
    return len(stems)

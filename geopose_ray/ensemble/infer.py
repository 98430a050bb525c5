"""The ensemble's inference, without Ray: out-of-fold statistics on the training cache (the fitting data), and
test predictions where each tile is decoded once and run through every fold model of every member held in the
same worker. :mod:`geopose_ray.cluster.ensemble` spreads these functions over the cluster."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from geopose_ray.data.cache import TrainingCache, downsample_rgb
from geopose_ray.data.layout import (
    CITIES,
    SHOWN,
    city_of,
    locate_metadata,
    lookup_metadata,
    read_metadata,
    scan_dir,
)
from geopose_ray.data.rasters import read_rgb
from geopose_ray.data.submission import write_prediction
from geopose_ray.engine.predict import load_model, predict_batch
from geopose_ray.engine.trainer import native_bf16, resolve_device
from geopose_ray.ensemble.combine import Prediction, combine
from geopose_ray.ensemble.fit import TileOof, tile_oof
from geopose_ray.ensemble.members import FoldModel, Member, check_fold_model, unreadable
from geopose_ray.errors import DataError, GeoposeError
from geopose_ray.geometry import direction_to_angle

Finish = Callable[[list[Prediction], str, float], Prediction]  # member predictions, city, gsd -> the ensemble's


def inference_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for inference: bf16 (fp16 on GPUs without it) where the device runs it natively, or
    None for fp32. ``amp``: auto (use it where supported), off. Outputs are cast back to fp32 before combining."""
    if amp not in ("auto", "off"):
        raise DataError(f"The value of `amp` is {amp!r}, but must be 'auto' or 'off'")
    if amp == "off":
        return None
    if device.type == "cuda":  # bf16 only where native: a T4 reports it supported but emulates it
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


class Runner:
    """A loaded model run the fast way for inference: channels-last memory and autocast where supported."""

    def __init__(self, checkpoint: str | Path, device: torch.device, amp: str = "auto") -> None:
        model, self.cfg, self.downsample = load_model(checkpoint, device)
        self.model = model.to(memory_format=torch.channels_last)
        self.device = device
        self.dtype = inference_dtype(device, amp)

    def __call__(
        self, image: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor, tta: str = "none"
    ) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
        image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return predict_batch(self.model, image, gsd, city, tta)


class AveragedRunner:
    """A fold model kept as its top-k checkpoints: the runners' predictions averaged (AGL and scale by their
    mean, the angle on the circle), as one model of the member."""

    def __init__(self, runners: Sequence[Runner]) -> None:
        self.runners = list(runners)
        self.cfg, self.downsample = self.runners[0].cfg, self.runners[0].downsample

    def __call__(
        self, image: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor, tta: str = "none"
    ) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
        outs = [r(image, gsd, city, tta) for r in self.runners]
        agl = np.mean([o[0] for o in outs], axis=0).astype(np.float32)
        scale = np.mean([o[1] for o in outs], axis=0)
        angle = direction_to_angle(
            np.sum([np.sin(o[2]) for o in outs], axis=0), np.sum([np.cos(o[2]) for o in outs], axis=0)
        )
        return agl, scale, angle


def fold_runner(fold: FoldModel, device: torch.device, amp: str, downsample: int) -> Runner | AveragedRunner:
    """A member's fold model: one runner, or the average of its top-k checkpoints' runners (each checked)."""
    if not fold.extra:
        return _fold_runner(fold, fold.checkpoint, device, amp, downsample)
    return AveragedRunner([_fold_runner(fold, c, device, amp, downsample) for c in fold.checkpoints])


def _fold_runner(fold: FoldModel, checkpoint: str, device: torch.device, amp: str, downsample: int) -> Runner:
    """A member's fold model, loaded and checked where it runs (the head does not download remote ones): it
    must load, and be trained at the cache's resolution.

    Raises:
        DataError: naming the checkpoint (the job re-raises it from the worker).
    """
    try:
        runner = Runner(checkpoint, device, amp)
    except torch.OutOfMemoryError:
        raise
    except (GeoposeError, KeyError, ValueError, RuntimeError) as e:  # unreadable, or not this project's model
        raise unreadable(fold, e) from e
    check_fold_model(fold, runner.downsample, downsample)
    return runner


def oof_fold(
    members: Sequence[Member], cache_path: str, fold: int, tta: str, device: str, threads: int, amp: str = "auto"
) -> list[TileOof]:
    """The fitting data of one fold: each member's model validated on ``fold`` predicts that fold's tiles (each
    read once from the cache), reduced per tile to sufficient statistics. Tiles in the cache's row order."""
    torch.set_num_threads(threads)
    cache = TrainingCache(cache_path)
    dev = resolve_device(device)
    models = []
    for m in members:
        found = [f for f in m.folds if f.val_fold == fold]
        if len(found) != 1:  # any other of its models trained on this fold's tiles: no honest prediction
            raise DataError(f"member {m.name} has {len(found)} fold models validated on fold {fold}, not one")
        models.append((m.name, fold_runner(found[0], dev, amp, cache.downsample)))
    out = []
    for row in (r for r in cache.rows if r.fold == fold):
        sample = cache.load(row.stem)
        image = torch.from_numpy(np.asarray(sample.image).transpose(2, 0, 1).copy())[None].to(dev)
        gsd = torch.tensor([sample.gsd], device=dev)
        city = torch.tensor([sample.city], device=dev)
        preds = {}
        for name, model in models:
            agl, scale, angle = model(image, gsd, city, tta)
            preds[name] = Prediction(agl[0].astype(np.float32), float(scale[0]), float(angle[0]))
        out.append(tile_oof(sample, fold, preds))
    return out


@dataclass
class ShardResult:
    """What one worker predicted."""

    stems: list[str]
    seconds: float  # wall time of the shard, models loaded included
    load_seconds: float  # loading every fold model once


def test_gsd(test_dir: Path, stems: Sequence[str], metadata: str | Path | None = None) -> dict[str, float]:
    """Per test stem its gsd (NaN where it has no row) from ``metadata``, default the metadata.csv beside the
    tiles, else the data root's above them (:func:`~geopose_ray.data.layout.locate_metadata`); all NaN without."""
    meta_path = locate_metadata(test_dir, metadata)
    meta = read_metadata(meta_path) if meta_path is not None else {}
    rows = {stem: lookup_metadata(meta, stem) for stem in stems}
    return {stem: row.gsd if row is not None else math.nan for stem, row in rows.items()}


def test_inputs(
    test_dir: Path, stems: Sequence[str], gsd: Mapping[str, float] | None = None
) -> dict[str, tuple[Path, float, int]]:
    """Per test stem: its RGB file, gsd (NaN without metadata) and city index; a clear error when one is missing.

    ``gsd``: each stem's gsd as the job resolved it (:func:`test_gsd`); default read here with :func:`test_gsd`."""
    files = scan_dir(test_dir)
    gsd = test_gsd(test_dir, stems) if gsd is None else gsd
    out = {}
    for stem in stems:
        if stem not in files or not files[stem].rgb:
            raise DataError(f"{test_dir}: no RGB image for test tile {stem}")
        out[stem] = (files[stem].rgb[0], float(gsd.get(stem, math.nan)), CITIES.index(city_of(stem)))
    return out


def predict_shard(
    members: Sequence[Member],
    test_dir: str,
    stems: Sequence[str],
    out_dir: str,
    downsample: int,
    finish: Finish,
    tta: str = "none",
    device: str = "auto",
    threads: int | None = None,
    amp: str = "auto",
    gsd: Mapping[str, float] | None = None,
) -> ShardResult:
    """Predict ``stems`` of ``test_dir`` into the submission at ``out_dir``.

    Every fold model of every member is loaded once; each tile is read and decoded once and run through all of
    them. A member's prediction is the mean of its fold models (circular for the angle); ``finish`` combines
    the members' predictions with the fitted weights, factors and scale model.

    ``gsd``: each stem's gsd as the job resolved it on the head (from ``--metadata`` or the metadata.csv it
    found); default ``finish.test_gsd`` when the finish carries it (the job's does), else read here from the
    metadata.csv beside the tiles or at the data root. When a fold model uses gsd, every tile of the shard must
    have a finite gsd > 0, checked before any tile is predicted.
    """
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if gsd is None:
        gsd = getattr(finish, "test_gsd", None)
    inputs = test_inputs(Path(test_dir), stems, gsd)
    dev = resolve_device(device)
    models = [[fold_runner(f, dev, amp, downsample) for f in m.folds] for m in members]
    loaded = time.perf_counter() - start
    needs = [f.key for m, runners in zip(members, models, strict=True) for f, r in zip(m.folds, runners, strict=True)
             if r.cfg.model.metadata]  # fmt: skip
    bad = [s for s in stems if not (math.isfinite(inputs[s][1]) and inputs[s][1] > 0)]
    if needs and bad:
        shown = ", ".join(bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
        raise DataError(
            f"{test_dir}: {len(bad)} of {len(stems)} test tile(s) have no finite gsd > 0 in the metadata.csv "
            f"({shown}), and fold model {needs[0]} uses gsd; add their rows (id, city, gsd) or pass --metadata PATH"
        )
    for stem in stems:
        path, tile_gsd, city = inputs[stem]
        rgb = read_rgb(path)
        if rgb.shape[0] % downsample or rgb.shape[1] % downsample:
            raise DataError(f"{path}: size {rgb.shape[1]}x{rgb.shape[0]} is not divisible by {downsample}")
        image = torch.from_numpy(downsample_rgb(rgb, downsample).transpose(2, 0, 1).copy())[None].to(dev)
        g = torch.tensor([tile_gsd], device=dev)
        c = torch.tensor([city], device=dev)
        per_member = []
        for member_models in models:
            folds = []
            for model in member_models:
                agl, scale, angle = model(image, g, c, tta)
                folds.append(Prediction(agl[0].astype(np.float32), float(scale[0]), float(angle[0])))
            per_member.append(combine(folds))
        final = finish(per_member, CITIES[city], tile_gsd)
        write_prediction(Path(out_dir), stem, final.agl, final.scale, final.angle, full_shape=rgb.shape[:2])
    return ShardResult(list(stems), time.perf_counter() - start, loaded)

"""The torch dataset over a training cache: samples are dicts of tensors, read without decoding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from geopose_ray.data.augment import AugmentConfig, GeoSample, augment
from geopose_ray.data.cache import TrainingCache
from geopose_ray.errors import DataError

log = logging.getLogger(__name__)


class GeoposeDataset(Dataset[dict[str, torch.Tensor]]):
    """Tiles of a cache, optionally restricted to some folds, optionally cropped and augmented.

    A sample is ``{"image": (3, H, W) uint8, "agl": (1, H, W) float32 metres (0 where no data),
    "valid": (1, H, W) bool, "angle": () radians, "scale": () pixels per metre at the sample's resolution,
    "gsd": () metres per pixel, "city": () index into CITIES, "index": () position in this dataset,
    "skipped": () unreadable tiles passed over to produce this sample}``.

    With ``crop``, each epoch draws ``crops_per_tile`` random squares of side ``crop`` from every tile (sample
    ``i`` is a crop of tile ``i // crops_per_tile``), before augmentation. Only the crop's pixels are read from
    the memory-mapped cache. With ``crop_scale`` (low, high) the square's side is ``crop × u``, u uniform in the
    range, resampled to ``crop``: flow lengths, hence the scale, are multiplied by ``1 / u``; heights are not.

    A tile that cannot be read (a corrupt or missing cache entry) either stops training at once with its name
    (``bad_tiles="fail"``), or is passed over with a warning for the next readable tile (``"skip"``, the default:
    one bad file must not kill a run hours in); the trainer sums ``skipped`` into the epoch's ``bad_tiles``.

    Crops and augmentation draw from ``default_rng([seed, epoch, index])`` (the crop first, then the geometric,
    then the photometric draws): independent for every sample, epoch and data-loader worker, and the same on a
    rerun. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        cache: TrainingCache | str,
        folds: Sequence[int] | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        bad_tiles: str = "skip",
        crop: int | None = None,
        crops_per_tile: int = 1,
        crop_scale: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.cache = cache if isinstance(cache, TrainingCache) else TrainingCache(cache)
        wanted = None if folds is None else set(folds)
        self.rows = [r for r in self.cache.rows if wanted is None or r.fold in wanted]
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.bad_tiles = bad_tiles
        self.crop = crop
        self.crops_per_tile = crops_per_tile if crop is not None else 1
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        if crop is not None:
            small = [r.stem for r in self.rows if min(self.cache.shape(r.stem)) < crop]
            if small:
                h, w = self.cache.shape(small[0])
                raise DataError(
                    f"{self.cache.path}: crop {crop} is larger than tile {small[0]} ({w}x{h} at the cache's "
                    f"resolution) and {len(small) - 1} more; use a smaller crop or a cache with less downsampling"
                )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows) * self.crops_per_tile

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tile, within = divmod(index, self.crops_per_tile)
        for skipped in range(len(self.rows)):
            i = (tile + skipped) % len(self.rows)
            try:
                sample = self._sample(i, i * self.crops_per_tile + within)
            except (OSError, ValueError, DataError) as e:
                where = self.cache.path / "entries" / self.rows[i].stem
                if self.bad_tiles == "fail":
                    raise DataError(
                        f"{where}: training tile cannot be read ({e}); rerun geopose-ray prepare to rewrite it, or "
                        "set bad_tiles: skip to pass over such tiles"
                    ) from e
                log.warning("%s: unreadable training tile skipped (%s)", where, e)
                continue
            sample["index"] = torch.tensor(index, dtype=torch.int64)
            sample["skipped"] = torch.tensor(skipped, dtype=torch.int64)
            return sample
        raise DataError(f"{self.cache.path}: no tile of this dataset can be read; rerun geopose-ray prepare")

    def _sample(self, tile: int, index: int) -> dict[str, torch.Tensor]:
        stem = self.rows[tile].stem
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.crop is None:
            s = self.cache.load(stem)
            geo = GeoSample(np.asarray(s.image), s.agl, s.scale, s.angle)
        else:
            h, w = self.cache.shape(stem)
            lo, hi = self.crop_scale
            side = self.crop if (lo, hi) == (1.0, 1.0) else round(self.crop * float(rng.uniform(lo, hi)))
            side = max(1, min(side, h, w))
            r, c = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            s = self.cache.load(stem, (r, c, side, side))
            geo = GeoSample(np.asarray(s.image), s.agl, s.scale, s.angle)
            if side != self.crop:
                geo = resize(geo, self.crop)
        if self.augment is not None:
            geo = augment(geo, self.augment, rng)
        valid = np.isfinite(geo.agl)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(geo.image.transpose(2, 0, 1))),
            "agl": torch.from_numpy(np.where(valid, geo.agl, np.float32(0.0))[None]),
            "valid": torch.from_numpy(valid[None]),
            "angle": torch.tensor(geo.angle, dtype=torch.float32),
            "scale": torch.tensor(geo.scale, dtype=torch.float32),
            "gsd": torch.tensor(s.gsd, dtype=torch.float32),
            "city": torch.tensor(s.city, dtype=torch.int64),
        }


def resize(s: GeoSample, size: int) -> GeoSample:
    """Resample a square sample to ``size`` × ``size``: RGB bilinearly, AGL by nearest neighbour (pixel centres
    mapped onto pixel centres). Flow lengths scale with the image, so the scale is multiplied by the zoom."""
    side = s.agl.shape[0]
    f = side / size  # source pixels per output pixel
    matrix = np.array([f, f])
    offset = 0.5 * f - 0.5
    agl = ndimage.affine_transform(
        s.agl.astype(np.float32), matrix, offset, output_shape=(size, size), order=0, mode="nearest"
    )
    channels = [
        ndimage.affine_transform(
            s.image[..., i].astype(np.float32), matrix, offset, output_shape=(size, size), order=1, mode="nearest"
        )
        for i in range(3)
    ]
    image = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
    return GeoSample(image, agl, s.scale * size / side, s.angle)

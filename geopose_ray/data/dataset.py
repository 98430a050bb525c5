"""The torch dataset over a training cache: samples are dicts of tensors, read without decoding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from geopose_ray.data.augment import AugmentConfig, GeoSample, augment
from geopose_ray.data.cache import TrainingCache
from geopose_ray.errors import DataError

log = logging.getLogger(__name__)


class GeoposeDataset(Dataset[dict[str, torch.Tensor]]):
    """Tiles of a cache, optionally restricted to some folds, optionally augmented.

    A sample is ``{"image": (3, H, W) uint8, "agl": (1, H, W) float32 metres (0 where no data),
    "valid": (1, H, W) bool, "angle": () radians, "scale": () pixels per metre at the cached resolution,
    "gsd": () metres per pixel, "city": () index into CITIES, "index": () position in this dataset,
    "skipped": () unreadable tiles passed over to produce this sample}``.

    A tile that cannot be read (a corrupt or missing cache entry) either stops training at once with its name
    (``bad_tiles="fail"``), or is passed over with a warning for the next readable tile (``"skip"``, the default:
    one bad file must not kill a run hours in); the trainer sums ``skipped`` into the epoch's ``bad_tiles``.

    Augmentation draws from ``default_rng([seed, epoch, index])``: independent for every sample, epoch and
    data-loader worker, and the same on a rerun. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        cache: TrainingCache | str,
        folds: Sequence[int] | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        bad_tiles: str = "skip",
    ) -> None:
        self.cache = cache if isinstance(cache, TrainingCache) else TrainingCache(cache)
        wanted = None if folds is None else set(folds)
        self.rows = [r for r in self.cache.rows if wanted is None or r.fold in wanted]
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.bad_tiles = bad_tiles

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for skipped in range(len(self.rows)):
            i = (index + skipped) % len(self.rows)
            try:
                sample = self._sample(i)
            except (OSError, ValueError, DataError) as e:
                where = self.cache.path / "entries" / self.rows[i].stem
                if self.bad_tiles == "fail":
                    raise DataError(
                        f"{where}: training tile cannot be read ({e}); rerun geopose-ray prepare to rewrite it, or "
                        "set bad_tiles: skip to pass over such tiles"
                    ) from e
                log.warning("%s: unreadable training tile skipped (%s)", where, e)
                continue
            sample["skipped"] = torch.tensor(skipped, dtype=torch.int64)
            return sample
        raise DataError(f"{self.cache.path}: no tile of this dataset can be read; rerun geopose-ray prepare")

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        s = self.cache.load(self.rows[index].stem)
        geo = GeoSample(np.asarray(s.image), s.agl, s.scale, s.angle)
        if self.augment is not None:
            geo = augment(geo, self.augment, np.random.default_rng([self.seed, self.epoch, index]))
        valid = np.isfinite(geo.agl)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(geo.image.transpose(2, 0, 1))),
            "agl": torch.from_numpy(np.where(valid, geo.agl, np.float32(0.0))[None]),
            "valid": torch.from_numpy(valid[None]),
            "angle": torch.tensor(geo.angle, dtype=torch.float32),
            "scale": torch.tensor(geo.scale, dtype=torch.float32),
            "gsd": torch.tensor(s.gsd, dtype=torch.float32),
            "city": torch.tensor(s.city, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }

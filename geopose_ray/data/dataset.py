"""The torch dataset over a training cache: samples are dicts of tensors, read without decoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from geopose_ray.data.cache import TrainingCache


class GeoposeDataset(Dataset[dict[str, torch.Tensor]]):
    """Tiles of a cache, optionally restricted to some folds.

    A sample is ``{"image": (3, H, W) uint8, "agl": (1, H, W) float32 metres (0 where no data),
    "valid": (1, H, W) bool, "angle": () radians, "scale": () pixels per metre at the cached resolution,
    "gsd": () metres per pixel, "city": () index into CITIES}``.
    """

    def __init__(self, cache: TrainingCache | str, folds: Sequence[int] | None = None) -> None:
        self.cache = cache if isinstance(cache, TrainingCache) else TrainingCache(cache)
        wanted = None if folds is None else set(folds)
        self.rows = [r for r in self.cache.rows if wanted is None or r.fold in wanted]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.cache.load(self.rows[index].stem)
        valid = np.isfinite(s.agl)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(s.image.transpose(2, 0, 1))),
            "agl": torch.from_numpy(np.where(valid, s.agl, np.float32(0.0))[None]),
            "valid": torch.from_numpy(valid[None]),
            "angle": torch.tensor(s.angle, dtype=torch.float32),
            "scale": torch.tensor(s.scale, dtype=torch.float32),
            "gsd": torch.tensor(s.gsd, dtype=torch.float32),
            "city": torch.tensor(s.city, dtype=torch.int64),
        }

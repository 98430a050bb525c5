"""Crop sampling from a full-resolution (K=1) cache vs loading the whole tile and cropping it.

Three ways to make a training sample from a ``--size``² tile of a K=1 cache, with the same augmentation: the whole
tile (what training without ``crop`` does: every pixel converted and augmented); the whole tile loaded, then a
random ``--crop``² square cut out and augmented (a loader that crops after loading); and ``GeoposeDataset`` with
``crop``, which reads only the square's part of the memory-mapped arrays. One process, one core, the same
tiles and draws, on the same machine in one run; every sample is timed and the medians are reported, as
samples/s per core.

    .venv/bin/python bench/bench_crops.py [--tiles 4] [--size 2048] [--crop 896] [--samples 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geopose_ray.data.augment import AugmentConfig, GeoSample, augment
from geopose_ray.data.cache import TrainingCache, prepare_cache
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.data.synth import synthesize


def whole_tile_crop(
    cache: TrainingCache, stem: str, crop: int, aug: AugmentConfig, rng: np.random.Generator
) -> dict[str, object]:
    """The reference: the whole tile loaded, then cropped and augmented."""
    s = cache.load(stem)
    agl = np.asarray(s.agl)
    h, w = agl.shape
    r, c = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    geo = GeoSample(np.asarray(s.image)[r : r + crop, c : c + crop], agl[r : r + crop, c : c + crop], s.scale, s.angle)
    geo = augment(geo, aug, rng)
    valid = np.isfinite(geo.agl)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(geo.image.transpose(2, 0, 1))),
        "agl": torch.from_numpy(np.where(valid, geo.agl, np.float32(0.0))[None]),
        "valid": torch.from_numpy(valid[None]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--crop", type=int, default=896)
    ap.add_argument("--samples", type=int, default=40, help="samples timed for each method")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "data", args.tiles, args.size, seed=0, workers=2)
        prepare_cache(root / "data" / "train", root / "cache", downsample=1, workers=1)
        cache = TrainingCache(root / "cache")
        stems = [r.stem for r in cache.rows]
        for _ in range(2):  # warm the page cache for all: none measures the disk
            for stem in stems:
                cache.load(stem)
        out: dict[str, object] = {"tile": args.size, "crop": args.crop, "samples": args.samples}
        for label, aug in (
            ("rot90 + flips", AugmentConfig()),
            ("rot90 + flips + rotate 10° + zoom 0.9-1.1", AugmentConfig(rotate_deg=10.0, zoom=(0.9, 1.1))),
        ):
            whole = GeoposeDataset(cache, augment=aug)
            crops = GeoposeDataset(cache, augment=aug, crop=args.crop, crops_per_tile=args.samples)
            timings: dict[str, list[float]] = {"whole tile (no crop)": [], "whole tile, then crop": [], "crop": []}
            for i in range(args.samples):
                tile = i % len(stems)
                t0 = time.perf_counter()
                whole[tile]
                timings["whole tile (no crop)"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                whole_tile_crop(cache, stems[tile], args.crop, aug, np.random.default_rng([0, 0, i]))
                timings["whole tile, then crop"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                crops[tile * args.samples + i]
                timings["crop"].append(time.perf_counter() - t0)
            medians = {k: statistics.median(v) for k, v in timings.items()}
            out[label] = {
                "median_ms": {k: round(v * 1e3, 1) for k, v in medians.items()},
                "samples_per_s_per_core": {k: round(1 / v, 1) for k, v in medians.items()},
                "crop vs whole tile": round(medians["whole tile (no crop)"] / medians["crop"], 2),
                "crop vs whole tile, then crop": round(medians["whole tile, then crop"] / medians["crop"], 2),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

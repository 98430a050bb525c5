"""Training-sample loading: the training cache vs decoding the original tiles every time.

The reference is what the published baseline does each epoch: decode the 2048² JPEG 2000 RGB and the AGL
GeoTIFF, read the json, downsample to 1024². The cache path is ``GeoposeDataset.__getitem__`` over a prepared
cache (memory-mapped arrays, no decoding). Both run in one process on one core, same tiles, same machine, in
one run; per-sample times are timed individually and the median is reported.

    .venv/bin/python bench/bench_loading.py [--tiles 8] [--size 2048] [--repeats 5]
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

from geopose_ray.data.cache import downsample_nearest, downsample_rgb, prepare_cache
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.data.layout import read_vflow
from geopose_ray.data.manifest import build_manifest
from geopose_ray.data.rasters import agl_cm_to_m, read_agl_cm, read_rgb
from geopose_ray.data.synth import synthesize


def reference_sample(directory: Path, rgb: str, agl: str, vflow: str, k: int) -> dict[str, object]:
    """Decode the originals and downsample, as the baseline loader does for every sample of every epoch."""
    image = downsample_rgb(read_rgb(directory / rgb), k)
    heights = agl_cm_to_m(downsample_nearest(read_agl_cm(directory / agl), k))
    scale, angle = read_vflow(directory / vflow)
    valid = np.isfinite(heights)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "agl": torch.from_numpy(np.where(valid, heights, np.float32(0))[None]),
        "valid": torch.from_numpy(valid[None]),
        "scale": scale / k,
        "angle": angle,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--downsample", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="passes over the tiles for each method")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "data", args.tiles, args.size, seed=0, workers=2)
        train = root / "data" / "train"
        t0 = time.perf_counter()
        prepare_cache(train, root / "cache", args.downsample, workers=1)
        prepare_s = time.perf_counter() - t0
        rows = build_manifest(train)
        dataset = GeoposeDataset(root / "cache")
        ref_times, cache_times = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            for i, r in enumerate(rows):
                t = time.perf_counter()
                reference_sample(train, r.rgb, r.agl, r.vflow, args.downsample)
                ref_times.append(time.perf_counter() - t)
                t = time.perf_counter()
                sample = dataset[i]
                _ = sample["image"].sum()  # touch the pixels so the memory map is really read
                cache_times.append(time.perf_counter() - t)
    ref, cache = statistics.median(ref_times), statistics.median(cache_times)
    result = {
        "tiles": args.tiles,
        "size": args.size,
        "downsample": args.downsample,
        "samples": len(ref_times),
        "reference_median_s": ref,
        "cache_median_s": cache,
        "reference_samples_per_s_per_core": 1 / ref,
        "cache_samples_per_s_per_core": 1 / cache,
        "speedup": ref / cache,
        "prepare_s_per_tile_one_core": prepare_s / args.tiles,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

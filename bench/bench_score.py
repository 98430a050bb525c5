"""Seconds per 2048² tile for ``geopose-ray score`` (streaming, one tile at a time per process).

Predictions are the truth perturbed with noise and no-data pixels, written in the submission format. Timed
with 1 and 2 worker processes, ``--repeats`` runs each, median reported.

    .venv/bin/python bench/bench_score.py [--tiles 8] [--size 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from geopose_ray.data.layout import read_vflow, scan_dir
from geopose_ray.data.rasters import read_agl
from geopose_ray.data.submission import write_prediction
from geopose_ray.data.synth import synthesize
from geopose_ray.scoring import score_dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "data", 4, args.size, seed=0, test_tiles=args.tiles, workers=2)
        truth, pred = root / "data" / "test_truth", root / "pred"
        for stem in scan_dir(truth):
            agl = read_agl(truth / f"{stem}_AGL.tif")
            noisy = np.nan_to_num(agl) + rng.normal(0, 1.0, agl.shape).astype(np.float32)
            noisy[rng.random(agl.shape) < 0.01] = np.nan
            scale, angle = read_vflow(truth / f"{stem}_VFLOW.json")
            write_prediction(pred, stem, noisy, scale * 1.05, angle + 0.05, full_shape=agl.shape)
        result: dict[str, object] = {"tiles": args.tiles, "size": args.size}
        for workers in (1, 2):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                report = score_dirs(truth, pred, workers=workers)
                times.append(time.perf_counter() - t)
            result[f"s_per_tile_{workers}_workers"] = statistics.median(times) / args.tiles
        result["score"] = report.score
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

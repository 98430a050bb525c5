"""The embedded default, end to end on this machine: synthesize, validate, prepare, predict, score.

Everything goes under ``runs/<name>/``. For now the predictor is the trivial one (each city's training means);
it is the floor every trained model must beat.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from geopose_ray.baselines import city_means
from geopose_ray.data.cache import TrainingCache, prepare_cache
from geopose_ray.data.layout import city_of, rgb_path, scan_dir
from geopose_ray.data.rasters import raster_info
from geopose_ray.data.submission import check_submission, write_prediction
from geopose_ray.data.synth import synthesize
from geopose_ray.data.validate import validate_dir
from geopose_ray.errors import DataError
from geopose_ray.metrics import ScoreReport, format_report
from geopose_ray.scoring import score_dirs


def predict_means(cache: TrainingCache, test_dir: Path, out_dir: Path) -> int:
    """Write a submission that predicts each city's training means for every test tile."""
    means = city_means(cache)
    k = cache.downsample
    stems = sorted(s for s, f in scan_dir(test_dir).items() if f.rgb)
    if not stems:
        raise DataError(f"{test_dir}: no test tiles (*_RGB.j2k or *_RGB.tif) to predict")
    for stem in stems:
        info = raster_info(rgb_path(test_dir, stem))
        agl, scale, angle = means[city_of(stem)]
        small = np.full((info.height // k, info.width // k), agl, dtype=np.float32)
        write_prediction(out_dir, stem, small, scale, angle, full_shape=(info.height, info.width))
    return len(stems)


def run_demo(
    name: str = "demo",
    runs_dir: str | Path = "runs",
    tiles: int = 48,
    size: int = 128,
    downsample: int = 2,
    seed: int = 0,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> ScoreReport:
    """Run the embedded default pipeline under ``runs_dir/name`` and return the test score."""
    root = Path(runs_dir) / name
    data, cache_dir, sub = root / "data", root / "cache", root / "submission"
    t0 = time.perf_counter()

    def step(n: int, text: str) -> None:
        log(f"[{n}/5 {time.perf_counter() - t0:6.1f}s] {text}")

    for own in (data, cache_dir, sub):  # the demo's own outputs: a rerun starts them afresh
        shutil.rmtree(own, ignore_errors=True)
    step(1, f"synthesize {tiles} training tiles of {size}px (seed {seed}) -> {data}")
    synthesize(data, tiles, size, seed=seed, workers=workers)
    step(2, "validate train/ and test/")
    for split in ("train", "test"):
        checked = validate_dir(data / split, workers=workers)
        log("       " + checked.summary())
        if not checked.ok:
            raise DataError(f"{data / split}: synthetic data failed validation: {checked.problems[0]}")
    step(3, f"prepare the training cache (downsample {downsample}) -> {cache_dir}")
    result = prepare_cache(data / "train", cache_dir, downsample, seed=seed, workers=workers)
    if result.errors:
        raise DataError(f"{cache_dir}: prepare failed: {result.errors[0]}")
    cache = TrainingCache(cache_dir)
    log(f"       {result.written} entries written, {result.skipped} already there")
    step(4, f"predict each city's training means (the floor to beat) -> {sub}")
    predict_means(cache, data / "test", sub)
    problems = check_submission(sub, data / "test")
    if problems:
        raise DataError(f"{sub}: submission incomplete: {problems[0]}")
    step(5, f"score against {data / 'test_truth'}")
    report = score_dirs(data / "test_truth", sub, workers=workers)
    log(format_report(report))
    (root / "score.json").write_text(json.dumps(report.as_dict(), indent=2))
    log(f"done in {time.perf_counter() - t0:.1f}s; submission: {sub}; score: {root / 'score.json'}")
    return report

"""The embedded default, end to end on this machine: synthesize, validate, prepare, predict, score.

Everything goes under ``runs/<name>/``. For now the predictor is the trivial one (each city's training means);
it is the floor every trained model must beat.
"""

from __future__ import annotations

import dataclasses
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
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.metrics import ScoreReport, format_report
from geopose_ray.scoring import score_dirs
from geopose_ray.sweep.config import SweepConfig

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "demo.yaml"  # what `make demo` sweeps


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


def demo_sweep(name: str, cache: Path, storage: Path) -> SweepConfig:
    """The embedded default's sweep: :data:`DEMO_CONFIG` as ``geopose-ray sweep screen`` reads it, with this
    run's ``name``, training ``cache`` and ``storage`` path in place of the file's.

    Raises:
        ConfigError: the file is missing (the package is installed without its source checkout's ``sweeps/``).
    """
    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"{DEMO_CONFIG}: the demo's sweep config is missing; run the demo from a source checkout")
    shipped = SweepConfig.from_yaml(DEMO_CONFIG)
    return dataclasses.replace(shipped, name=name, cache=str(cache), storage_path=str(storage))


def run_demo(
    name: str = "demo",
    runs_dir: str | Path = "runs",
    tiles: int = 48,
    size: int = 128,
    downsample: int = 2,
    seed: int = 0,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    sweep: bool = True,
) -> ScoreReport:
    """Run the embedded default pipeline under ``runs_dir/name``; returns the test score of the best model
    (of the trivial predictor with ``sweep=False``)."""
    root = Path(runs_dir) / name
    data, cache_dir, floor_sub = root / "data", root / "cache", root / "submission-means"
    sub, sweeps = root / "submission", root / "sweeps"
    steps = 7 if sweep else 5
    t0 = time.perf_counter()

    def step(n: int, text: str) -> None:
        log(f"[{n}/{steps} {time.perf_counter() - t0:6.1f}s] {text}")

    for own in (data, cache_dir, floor_sub, sub, sweeps):  # the demo's own outputs: a rerun starts afresh
        shutil.rmtree(own, ignore_errors=True)
    for old in root.glob("oof-*.pkl"):
        old.unlink()
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
    step(4, f"predict each city's training means (the floor to beat) -> {floor_sub}")
    predict_means(cache, data / "test", floor_sub)
    problems = check_submission(floor_sub, data / "test")
    if problems:
        raise DataError(f"{floor_sub}: submission incomplete: {problems[0]}")
    step(5, f"score the floor against {data / 'test_truth'}")
    floor = score_dirs(data / "test_truth", floor_sub, workers=workers)
    log(format_report(floor))
    report = floor
    if sweep:
        from geopose_ray.cluster.connect import connected
        from geopose_ray.cluster.driver import run_sweep
        from geopose_ray.ensemble.job import EnsembleOptions, run_ensemble
        from geopose_ray.sweep.table import format_results

        cfg = demo_sweep(name, cache_dir, sweeps)
        step(6, f"sweep {len(cfg.trial_configs())} configurations on local Ray (rungs {cfg.rungs}) -> {sweeps}")
        with connected(local_dashboard=False):
            swept = run_sweep(cfg)
            log(format_results(swept.rows))
            step(7, f"ensemble the {len(swept.finalists)} finalists (all folds), predict the test split -> {sub}")
            ens = run_ensemble(cfg, EnsembleOptions(data / "test", out_dir=root, truth_dir=data / "test_truth"))
        for label, value in ens.fit.progression:
            log(f"       out of fold {value:8.4f}  {label}")
        report = ens.report if ens.report is not None else floor
        log(format_report(report))
        log(
            f"floor (training means): score {floor.score:.4f}, mean AGL R² {_mean_agl_r2(floor):.3f}; ensemble of "
            f"{len(ens.fit.active_members)} member(s) after {cfg.rungs[-1]} epochs: score {report.score:.4f}, "
            f"mean AGL R² {_mean_agl_r2(report):.3f} (heights come first; the direction needs more tiles and "
            "epochs, see BENCHMARKS.md)"
        )
        log(f"submission archive: {ens.archive}; ensemble fit: {root / 'fit.json'}")
        log(f"results table: {swept.table_path}; MLflow UI: mlflow ui --backend-store-uri {cfg.mlflow_uri}")
    (root / "score.json").write_text(json.dumps(report.as_dict(), indent=2))
    log(f"done in {time.perf_counter() - t0:.1f}s; submission: {sub if sweep else floor_sub}; "
        f"score: {root / 'score.json'}")  # fmt: skip
    return report


def _mean_agl_r2(report: ScoreReport) -> float:
    return sum(c.agl_r2 for c in report.cities.values()) / max(1, len(report.cities))

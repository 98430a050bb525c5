"""``geopose-ray score``: score a prediction directory against a truth directory, one tile at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from geopose_ray.data.layout import agl_path, city_of, read_vflow, scan_dir, vflow_path
from geopose_ray.data.rasters import read_agl
from geopose_ray.errors import DataError
from geopose_ray.metrics import ScoreReport, TileStats, score_report, tile_stats
from geopose_ray.parallel import pmap


@dataclass(frozen=True)
class _Job:
    truth: Path
    pred: Path
    stem: str


def _score_tile(job: _Job) -> TileStats:
    city = city_of(job.stem)
    agl_true = read_agl(agl_path(job.truth, job.stem))
    scale_true, angle_true = read_vflow(vflow_path(job.truth, job.stem))
    pred_agl_p, pred_vflow_p = agl_path(job.pred, job.stem), vflow_path(job.pred, job.stem)
    if not pred_agl_p.exists() or not pred_vflow_p.exists():
        return tile_stats(job.stem, city, agl_true, scale_true, angle_true, None, math.nan, math.nan)
    try:
        agl_pred = read_agl(pred_agl_p)
        scale_pred, angle_pred = read_vflow(pred_vflow_p)
    except DataError as e:
        stats = tile_stats(job.stem, city, agl_true, scale_true, angle_true, None, math.nan, math.nan)
        return replace(stats, failed=f"unreadable prediction: {e}")
    return tile_stats(job.stem, city, agl_true, scale_true, angle_true, agl_pred, scale_pred, angle_pred)


def score_dirs(truth: str | Path, pred: str | Path, workers: int | None = None) -> ScoreReport:
    """Score every truth tile (``*_AGL.tif`` + ``*_VFLOW.json`` in ``truth``) against ``pred``."""
    truth, pred = Path(truth), Path(pred)
    tiles = {s: f for s, f in scan_dir(truth).items() if f.agl is not None or f.vflow is not None}
    if not tiles:
        raise DataError(f"{truth}: no *_AGL.tif with *_VFLOW.json found; pass the truth directory")
    incomplete = sorted(s for s, f in tiles.items() if f.agl is None or f.vflow is None)
    if incomplete:
        raise DataError(
            f"{truth}: {len(incomplete)} truth tile(s) lack their _AGL.tif or _VFLOW.json (first: {incomplete[0]}); "
            "run geopose-ray validate on the truth directory"
        )
    stems = sorted(tiles)
    if not pred.is_dir():
        raise DataError(f"{pred}: not a directory; pass the submission directory")
    jobs = [_Job(truth, pred, s) for s in stems]
    return score_report(pmap(_score_tile, jobs, workers=workers, desc="score"))

"""The ensemble job on Ray: a sweep's finalists → out-of-fold statistics → fitted weights, city factors and scale
model → test inference spread over the cluster → the submission, its archive, its score, and an MLflow run.

Everything that can be checked is checked before any inference starts: the members and every checkpoint, that
they share one input resolution and cover every fold, and that the test directory has tiles. Checkpoints on
remote storage are checked by the workers that download them, not downloaded to the head first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from geopose_ray.cluster.connect import connect
from geopose_ray.data.cache import TrainingCache
from geopose_ray.data.layout import scan_dir
from geopose_ray.data.submission import check_submission
from geopose_ray.engine.predict import tta_transforms
from geopose_ray.engine.trainer import resolve_device
from geopose_ray.ensemble.combine import Prediction
from geopose_ray.ensemble.fit import EnsembleFit, OofStats, TileOof, apply_fit, fit_ensemble, tile_oof
from geopose_ray.ensemble.infer import ShardResult, fold_runner, predict_shard
from geopose_ray.ensemble.members import Member, check_members, find_members
from geopose_ray.errors import DataError, GeoposeError
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.metrics import ScoreReport
from geopose_ray.storage import redact, stat
from geopose_ray.sweep.config import SweepConfig
from geopose_ray.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class EnsembleResult:
    """What the job produced."""

    submission: Path  # the challenge-format directory
    archive: Path  # its .tar.gz
    fit: EnsembleFit
    members: list[Member]
    tiles: int
    inference_s: float  # wall time of the test inference (all workers, models loaded included)
    score: float | None  # against the truth directory, when one was given
    report: ScoreReport | None


def oof_fold(
    members: list[Member], cache_path: str, fold: int, tta: str, device: str, threads: int, amp: str = "auto"
) -> list[TileOof]:
    """The fitting data of one fold: each member's model validated on ``fold`` predicts that fold's tiles (read
    once from the cache), reduced per tile to sufficient statistics."""
    torch.set_num_threads(threads)
    cache = TrainingCache(cache_path)
    dev = resolve_device(device)
    models = []
    for m in members:
        (f,) = [f for f in m.folds if f.val_fold == fold]
        models.append((m.name, fold_runner(f, dev, amp, cache.downsample)))
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


class _Finish:
    """Applies a fit to one tile's member predictions (picklable, for the workers)."""

    def __init__(self, fit: EnsembleFit, names: list[str]) -> None:
        self.fit = fit
        self.names = names

    def __call__(self, preds: list[Prediction], city: str, gsd: float) -> Prediction:
        return apply_fit(self.fit, dict(zip(self.names, preds, strict=True)), city, gsd)


def _fingerprint(members: list[Member], cache: TrainingCache, tta: str, amp: str) -> str:
    """Names the OOF statistics: the same members, checkpoints (by path, size and time) and cache reuse them."""
    h = hashlib.sha256(json.dumps([str(cache.path.resolve()), len(cache), tta, amp]).encode())
    for m in members:
        for f in m.folds:
            size, mtime = stat(f.checkpoint) or (-1, -1)
            h.update(f"{m.name}|{f.key}|{redact(f.checkpoint)}|{size}|{mtime}".encode())
    return h.hexdigest()[:16]


def _gather(refs: list[Any]) -> list[Any]:
    """``ray.get`` of the job's tasks; a worker's own error (a fold model that does not load or was trained at
    another resolution, a test tile of the wrong size) is raised as itself, one line naming the file, not as
    Ray's task error with the worker's traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        try:  # the other tasks' work is moot now: stop those still running rather than leave them
            # Only unfinished ones: Ray 2.60 aborts the driver ("Tried to complete task that was not pending") when
            # a cancel races with the completion of the task it cancels, as it did for the failed task itself.
            _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in unfinished:
                ray.cancel(ref)
            if unfinished:
                ray.wait(unfinished, num_returns=len(unfinished), timeout=60, fetch_local=False)
        except Exception as cleanup:  # the task's error, not this, is what the user needs
            log.warning("could not cancel the ensemble's other tasks (%s)", cleanup)
        if isinstance(e.cause, GeoposeError):
            raise e.cause from None
        raise


def _shards(stems: list[str], n: int) -> list[list[str]]:
    return [s for s in (stems[i::n] for i in range(n)) if s]


def run_ensemble(
    cfg: SweepConfig,
    test_dir: str | Path,
    out_dir: str | Path | None = None,
    truth_dir: str | Path | None = None,
    names: list[str] | None = None,
    tta: str = "none",
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    amp: str = "auto",
) -> EnsembleResult:
    """Build the ensemble of a finished sweep and write its submission.

    Args:
        cfg: the sweep's config (its files' home holds trials.json; its cache the training tiles).
        test_dir: the test tiles (challenge layout).
        out_dir: where the submission, archive and fit go (default ``<sweep dir>/ensemble``).
        truth_dir: the test truth, if known (the synthetic ``test_truth/``): the submission is scored.
        names: the members (screening trial ids); default every finalist.
        tta: test-time augmentation for every member (none, flip, d4).
        workers: inference tasks (default: the cluster's CPUs, or its GPUs with ``gpus_per_worker``).
        gpus_per_worker: GPUs per inference task; fractions share a GPU between small members.
        amp: ``auto`` runs the members in bf16 (fp16 on GPUs without it) with channels-last memory where the
            device supports it, for the OOF and the test predictions alike; ``off`` keeps fp32.
    """
    tta_transforms(tta)
    # Ray's workers run in directories of their own: every path they get must be absolute.
    test_dir = Path(test_dir).resolve()
    out = (Path(out_dir) if out_dir is not None else cfg.out_dir / "ensemble").resolve()
    cfg.refuse_outputs_in_job_copy(("the ensemble's output directory", out, "Give --out an absolute path outside it."))
    members = find_members(cfg.files.home, names)
    cache = TrainingCache(cfg.cache)
    folds = sorted({r.fold for r in cache.rows})
    for m in members:
        have = sorted(f.val_fold for f in m.folds)
        if have != folds:
            raise DataError(
                f"member {m.name} has fold models validated on folds {have}, the cache has folds {folds}; every "
                "member needs one per fold (its fold runs may have failed: rerun the sweep with --resume)"
            )
    check_members(members, cache.downsample)
    stems = sorted(s for s, f in scan_dir(test_dir).items() if f.rgb) if test_dir.is_dir() else []
    if not stems:
        raise DataError(f"{test_dir}: no test tiles (*_RGB.j2k or *_RGB.tif); give the test directory")
    if truth_dir is not None and not Path(truth_dir).is_dir():
        raise DataError(f"{truth_dir}: the truth directory does not exist")
    connect()
    out.mkdir(parents=True, exist_ok=True)

    # Out-of-fold statistics: one task per fold, each member's model of that fold in the same worker.
    resources = {"num_cpus": 1, "num_gpus": gpus_per_worker}
    oof_path = out / f"oof-{_fingerprint(members, cache, tta, amp)}.pkl"
    if oof_path.exists():
        tiles: list[TileOof] = pickle.loads(oof_path.read_bytes())
        log.info("reusing out-of-fold statistics %s", oof_path)
    else:
        oof_task: Any = ray.remote(oof_fold).options(**resources)
        parts = _gather([oof_task.remote(members, str(cache.path.resolve()), k, tta, device, 1, amp) for k in folds])
        tiles = [t for part in parts for t in part]
        tmp = oof_path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(tiles))
        tmp.replace(oof_path)
    fit = fit_ensemble(OofStats.from_tiles(tiles))
    atomic_write_text(out / "fit.json", fit.to_json())

    # Test inference: each worker loads every active member's fold models once and decodes each tile once.
    active = [m for m in members if m.name in fit.active_members]
    if workers is None:
        avail = ray.available_resources()
        workers = int(avail.get("GPU", 0) / gpus_per_worker) if gpus_per_worker else int(avail.get("CPU", 1))
    workers = max(1, min(workers, len(stems)))
    submission = out / "submission"
    shutil.rmtree(submission, ignore_errors=True)
    submission.mkdir(parents=True)
    finish = _Finish(fit, [m.name for m in active])
    task: Any = ray.remote(predict_shard).options(**resources)
    start = time.perf_counter()
    shards: list[ShardResult] = _gather(
        [
            task.remote(active, str(test_dir), shard, str(submission), cache.downsample, finish, tta, device, 1, amp)
            for shard in _shards(stems, workers)
        ]
    )
    inference_s = time.perf_counter() - start
    problems = check_submission(submission, test_dir)
    if problems:
        raise DataError(f"{submission}: the written submission is incomplete: {problems[0]}")
    archive = out / "submission.tar.gz"
    with (
        tempfile.NamedTemporaryFile(dir=out, suffix=".tar.gz", delete=False) as tmpf,
        tarfile.open(fileobj=tmpf, mode="w:gz") as tar,
    ):
        for p in sorted(submission.iterdir()):
            tar.add(p, arcname=p.name)
    Path(tmpf.name).replace(archive)
    score, report = None, None
    if truth_dir is not None:
        from geopose_ray.scoring import score_dirs

        report = score_dirs(truth_dir, submission)
        score = report.score
    result = EnsembleResult(submission, archive, fit, members, len(stems), inference_s, score, report)
    _track(cfg, result, tta, sum(s.load_seconds for s in shards))
    return result


def _track(cfg: SweepConfig, result: EnsembleResult, tta: str, load_s: float) -> None:
    """The ensemble's MLflow run under the sweep's parent: members, weights, factors, the out-of-fold progression
    (a table and a plot), the test score. MLflow being down never fails the job: the files are on disk."""
    fit = result.fit
    local = not cfg.mlflow_uri.startswith(("http://", "https://"))
    artifacts = str(cfg.out_dir / "mlartifacts") if local else None
    tracker = Tracker(cfg.mlflow_uri, cfg.experiment or cfg.name, cfg.name, artifacts)
    params = {
        "members": ",".join(m.name for m in result.members),
        "method": fit.method,
        "tta": tta,
        "scale_blend": f"{fit.scale_blend:.3f}",
        **{f"weight.{m}": f"{w:.4f}" for m, w in fit.weights.items()},
        **{f"city_factor.{c}": f"{f:.4f}" for c, f in fit.city_factors.items()},
    }
    try:
        run = tracker.child("ensemble", params, "ensemble", "ensemble")
        if run is None:
            return
        metrics = {"oof_score": fit.score, "test_tiles_per_s": result.tiles / max(result.inference_s, 1e-9)}
        if result.score is not None and math.isfinite(result.score):
            metrics["test_score"] = result.score
        tracker.metrics(run, metrics, 0)
        with tempfile.TemporaryDirectory() as d:
            table = Path(d) / "progression.csv"
            table.write_text("step,oof_score,kept\n" + "".join(
                f"\"{s}\",{v:.6f},{kept}\n" for rows, kept in ((fit.progression, 1), (fit.rejected, 0)) for s, v in rows
            ))  # fmt: skip
            tracker.artifact(run, table)
            tracker.artifact(run, progression_plot(fit, Path(d) / "progression.png"))
            fit_file = Path(d) / "fit.json"
            fit_file.write_text(fit.to_json())
            tracker.artifact(run, fit_file)
        tracker.tags(run, {"status": "done", "submission": str(result.submission.resolve())})
        tracker.finish(run)
        tracker.flush(timeout_s=30)
    except Exception as e:  # the submission and fit.json are written; MLflow is a record, not a dependency
        log.warning("MLflow unavailable for the ensemble run (%s); fit.json is at %s", e, result.submission.parent)


def progression_plot(fit: EnsembleFit, path: Path) -> Path:
    """Out-of-fold score after each kept step of the fit (like the seed's progression list)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s for s, _ in fit.progression]
    values = [v for _, v in fit.progression]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(labels)))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), [label[:60] for label in labels])
    ax.invert_yaxis()
    lo = min(values)
    ax.set_xlim(lo - 0.1 * (max(values) - lo + 1e-3), max(values) + 0.02 * abs(max(values)) + 1e-3)
    ax.set_xlabel("out-of-fold score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def result_summary(result: EnsembleResult) -> dict[str, Any]:
    """The job's outcome as plain values (printed by sweeps/ensemble.py, written to summary.json)."""
    return {
        "submission": str(result.submission),
        "archive": str(result.archive),
        "tiles": result.tiles,
        "tiles_per_s": result.tiles / max(result.inference_s, 1e-9),
        "members": [m.name for m in result.members],
        "weights": result.fit.weights,
        "city_factors": result.fit.city_factors,
        "scale_blend": result.fit.scale_blend,
        "progression": result.fit.progression,
        "oof_score": result.fit.score,
        "test_score": result.score,
    }

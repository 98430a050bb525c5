"""The ensemble job: a sweep's finalists → out-of-fold statistics → fitted weights, city factors and scale model
→ test inference spread over the cluster → the submission, its archive, its score, and an MLflow run.

Everything that can be checked is checked before any inference starts: the members and every checkpoint, that
they share one input resolution and cover every fold, that the test directory has tiles, and that each has a gsd
when a member's model uses it (from the metadata.csv beside the tiles, the data root's, or ``--metadata``; before
the test inference also when the fitted scale model needs it). Checkpoints on remote storage are checked by the
workers that download them, not downloaded to the head first. No Ray here: its tasks are
:mod:`geopose_ray.cluster.ensemble`'s, imported when the job reaches them.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geopose_ray.data.cache import TrainingCache
from geopose_ray.data.layout import (
    MetadataRow,
    locate_metadata,
    lookup_metadata,
    read_metadata,
    require_gsd,
    scan_dir,
)
from geopose_ray.data.submission import check_submission
from geopose_ray.engine.predict import tta_transforms
from geopose_ray.ensemble.combine import Prediction
from geopose_ray.ensemble.fit import EnsembleFit, OofStats, TileOof, apply_fit, fit_ensemble
from geopose_ray.ensemble.infer import ShardResult
from geopose_ray.ensemble.members import Member, check_members, find_members
from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_bytes, atomic_write_text
from geopose_ray.metrics import ScoreReport
from geopose_ray.storage import redact, stat
from geopose_ray.sweep.config import SweepConfig
from geopose_ray.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleOptions:
    """What one ensemble job builds from a finished sweep, and how."""

    test_dir: str | Path  # the test tiles (challenge layout)
    out_dir: str | Path | None = None  # submission, archive, fit.json, OOF statistics; default <sweep dir>/ensemble
    truth_dir: str | Path | None = None  # the test truth, if known (synthetic test_truth/): the submission is scored
    members: tuple[str, ...] | None = None  # screening trial ids; default every finalist
    tta: str = "none"  # test-time augmentation for every member: none, flip, d4
    # auto: bf16 (fp16 on GPUs without it) and channels-last memory where the device supports it, for the OOF
    # and the test predictions alike; off: fp32
    amp: str = "auto"
    workers: int | None = None  # parallel Ray tasks for the test inference; default the cluster's CPUs, or GPUs
    gpus_per_worker: float = 0.0  # GPUs per Ray task (OOF and inference); fractions share a GPU
    device: str = "auto"  # torch device inside each task: auto, cpu, cuda
    # the metadata.csv with the test tiles' gsd; default the one beside the tiles, else the data root's above them
    metadata: str | Path | None = None


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


@dataclass(frozen=True)
class _Job:
    """The checked inputs of one run: absolute paths (Ray's workers run in directories of their own)."""

    options: EnsembleOptions
    test_dir: Path
    out: Path
    members: list[Member]
    cache: TrainingCache
    folds: list[int]
    stems: list[str]  # the test tiles
    meta_path: Path | None  # the metadata.csv the test tiles' gsd was read from, None without one
    gsd: dict[str, float]  # each test tile's gsd (NaN without a row), resolved here for the workers


class _Finish:
    """Applies a fit to one tile's member predictions (picklable, for the workers)."""

    def __init__(self, fit: EnsembleFit, names: list[str], test_gsd: dict[str, float] | None = None) -> None:
        self.fit = fit
        self.names = names
        self.test_gsd = test_gsd  # each test tile's gsd as the head resolved it: the workers read no metadata.csv

    def __call__(self, preds: list[Prediction], city: str, gsd: float) -> Prediction:
        return apply_fit(self.fit, dict(zip(self.names, preds, strict=True)), city, gsd)


def run_ensemble(cfg: SweepConfig, options: EnsembleOptions) -> EnsembleResult:
    """Build the ensemble of a finished sweep and write its submission: out-of-fold statistics (reused from an
    earlier run with the same members, checkpoints, cache, tta and amp), the fit, the test inference, the archive,
    the score when the truth is given, and the MLflow run.

    Args:
        cfg: the sweep's config (its files' home holds trials.json; its cache the training tiles).
        options: the test tiles, outputs, members and how they run.

    Raises:
        DataError: bad input, before any inference (:func:`_check`), or a worker's own error (a fold model that does
            not load), after the unfinished tasks are cancelled.
    """
    job = _check(cfg, options)
    job.out.mkdir(parents=True, exist_ok=True)
    tiles = _oof_statistics(job)
    fit = _fit(job, tiles)
    submission, shards, inference_s = _predict(job, fit)
    archive = _archive(submission, job.out / "submission.tar.gz")
    report = _score(options.truth_dir, submission)
    score = report.score if report is not None else None
    result = EnsembleResult(submission, archive, fit, job.members, len(job.stems), inference_s, score, report)
    _track(cfg, result, options.tta)
    log.info("test inference %.1fs, of which loading models %.1fs", inference_s, sum(s.load_seconds for s in shards))
    return result


def default_members(finalists: list[Member]) -> list[Member]:
    """The members an ensemble takes by default: the finalists that had fold runs (all of them when none had,
    so that the fit refuses them with its reason), the rest left out with a warning; those whose fold runs
    partly failed stay, and the fit takes the folds they share (:func:`shared_folds`)."""
    with_runs = [m for m in finalists if len(m.folds) > 1]
    left = [m.name for m in finalists if len(m.folds) <= 1]
    if with_runs and left:
        log.warning("members: %d finalist(s) without fold runs left out (%s)", len(left), ", ".join(left))
    return with_runs or finalists


def shared_folds(members: list[Member], cache_folds: list[int]) -> list[int]:
    """The folds the ensemble is fitted on: those every member has a model validated on.

    The fit is out of fold only where every member's prediction of a tile comes from a model that never trained
    on it: its model validated on the tile's fold. Members whose fold models cover different folds are therefore
    fitted on the tiles of the folds they share; a member lacking fold k's model has no honest prediction of fold
    k's tiles (each of its other models trained on them), so pooling each member over its own folds would leak.

    Raises:
        DataError: fewer than two shared folds (the scale model is fitted fold by fold).
    """
    shared = sorted(set(cache_folds).intersection(*({f.val_fold for f in m.folds} for m in members)))
    if len(shared) < 2:
        cover = "; ".join(f"{m.name}: {sorted(f.val_fold for f in m.folds)}" for m in members)
        raise DataError(
            f"the members share fold models on folds {shared} only ({cover}); an out-of-fold fit needs at least "
            "2 shared folds: choose members with fold runs (--members), or run the missing folds (sweeps/promote.py, "
            "or rerun the sweep with --resume if fold runs failed)"
        )
    missing = {m.name: sorted(set(cache_folds) - {f.val_fold for f in m.folds}) for m in members}
    if any(missing.values()):
        log.warning("the ensemble is fitted on folds %s, the ones every member has a model for", shared)
    return shared


def _check(cfg: SweepConfig, options: EnsembleOptions) -> _Job:
    """Every check that needs no inference: the tta name, outputs outside a Ray job's copy of its working
    directory, the members and their checkpoints (one model per fold of the cache, one resolution), test tiles, their
    gsd where a member's model uses it (:func:`check_test_gsd`), the truth directory.

    Raises:
        DataError, ConfigError: naming the input and the fix.
    """
    tta_transforms(options.tta)
    test_dir = Path(options.test_dir).resolve()
    out = (Path(options.out_dir) if options.out_dir is not None else cfg.out_dir / "ensemble").resolve()
    cfg.refuse_outputs_in_job_copy(("the ensemble's output directory", out, "Give --out an absolute path outside it."))
    members = find_members(cfg.files.home, list(options.members) if options.members is not None else None)
    cache = TrainingCache(cfg.cache)
    if options.members is None:
        members = default_members(members)
    folds = shared_folds(members, sorted({r.fold for r in cache.rows}))
    configs = check_members(members, cache.downsample)
    stems = sorted(s for s, f in scan_dir(test_dir).items() if f.rgb) if test_dir.is_dir() else []
    if not stems:
        raise DataError(f"{test_dir}: no test tiles (*_RGB.j2k or *_RGB.tif); give the test directory")
    meta_path, gsd = check_test_gsd(configs, test_dir, stems, options.metadata)
    if options.truth_dir is not None and not Path(options.truth_dir).is_dir():
        raise DataError(f"{options.truth_dir}: the truth directory does not exist")
    return _Job(options, test_dir, out, members, cache, folds, stems, meta_path, gsd)


def check_test_gsd(
    configs: Mapping[str, Mapping[str, Any]], test_dir: Path, stems: Sequence[str], metadata: str | Path | None = None
) -> tuple[Path | None, dict[str, float]]:
    """Every test tile's gsd, and the refusal, before any model is loaded, when a fold model uses it and a tile
    has none. ``configs``: fold model key → its training config (the checkpoint's, as :func:`check_members`
    returns them: read with the tensors memory-mapped, no model built); one whose ``model.metadata`` is set needs
    every tile's gsd. ``metadata``: ``--metadata``, default the metadata.csv beside the tiles, else the data
    root's above them. Returns the metadata.csv read (None without one) and each stem's gsd (NaN without a row).

    Raises:
        DataError: one line with the count of tiles lacking a finite gsd > 0, the first few and the file.
    """
    meta_path = locate_metadata(test_dir, metadata)
    meta = read_metadata(meta_path) if meta_path is not None else {}
    needs = sorted(key for key, c in configs.items() if bool((c.get("model") or {}).get("metadata", False)))
    if needs:
        require_gsd(meta_path, meta, stems, test_dir, f"fold model {needs[0]} (it uses gsd)")
    rows = {stem: lookup_metadata(meta, stem) for stem in stems}
    return meta_path, {stem: row.gsd if row is not None else math.nan for stem, row in rows.items()}


def _fingerprint(members: list[Member], cache: TrainingCache, tta: str, amp: str) -> str:
    """Names the OOF statistics: the same members, checkpoints (by path, size and time) and cache reuse them."""
    h = hashlib.sha256(json.dumps([str(cache.path.resolve()), len(cache), tta, amp]).encode())
    for m in members:
        for f in m.folds:
            size, mtime = stat(f.checkpoint) or (-1, -1)
            h.update(f"{m.name}|{f.key}|{redact(f.checkpoint)}|{size}|{mtime}".encode())
    return h.hexdigest()[:16]


def _oof_statistics(job: _Job) -> list[TileOof]:
    """Every training tile's out-of-fold statistics: one Ray task per fold, each member's model of that fold in
    the same worker. Kept in ``<out>/oof-<fingerprint>.pkl``, written atomically (a temporary file in the same
    directory, then renamed), and reused by a later run with the same fingerprint; an unreadable one is recomputed."""
    o = job.options
    path = job.out / f"oof-{_fingerprint(job.members, job.cache, o.tta, o.amp)}.pkl"
    if path.exists():
        try:
            tiles: list[TileOof] = pickle.loads(path.read_bytes())
            log.info("reusing out-of-fold statistics %s", path)
            return tiles
        except Exception as e:  # a cache: whatever makes it unreadable, computing it again mends it
            log.warning("recomputing the out-of-fold statistics: %s is unreadable (%s)", path, e)
    from geopose_ray.cluster.ensemble import oof_on_ray

    cache_path = str(job.cache.path.resolve())
    tiles = oof_on_ray(job.members, cache_path, job.folds, o.tta, o.device, o.amp, o.gpus_per_worker)
    atomic_write_bytes(path, pickle.dumps(tiles))
    return tiles


def _fit(job: _Job, tiles: list[TileOof]) -> EnsembleFit:
    """Weights, city factors and the scale model fitted on the OOF statistics; written to ``<out>/fit.json``."""
    fit = fit_ensemble(OofStats.from_tiles(tiles))
    atomic_write_text(job.out / "fit.json", fit.to_json())
    return fit


def _predict(job: _Job, fit: EnsembleFit) -> tuple[Path, list[ShardResult], float]:
    """The test tiles predicted by the fit's active members into a fresh ``<out>/submission`` over Ray, each task
    loading every fold model once and decoding each tile once; checked complete. Returns the submission, each
    shard's result and the inference's wall time in seconds.

    Raises:
        DataError: a worker's own error, or a submission missing a tile.
    """
    from geopose_ray.cluster.ensemble import predict_on_ray

    o = job.options
    active = [m for m in job.members if m.name in fit.active_members]
    submission = job.out / "submission"
    shutil.rmtree(submission, ignore_errors=True)
    submission.mkdir(parents=True)
    if fit.scale_model is not None and fit.scale_blend > 0:  # the fitted scale model reads each tile's gsd
        meta = {s: MetadataRow(s, "", g) for s, g in job.gsd.items()}
        require_gsd(job.meta_path, meta, job.stems, job.test_dir, "the ensemble's scale model")
    finish = _Finish(fit, [m.name for m in active], job.gsd)
    start = time.perf_counter()
    shards = predict_on_ray(
        active, str(job.test_dir), job.stems, str(submission), job.cache.downsample, finish, o.tta, o.device, o.amp,
        o.workers, o.gpus_per_worker,
    )  # fmt: skip
    inference_s = time.perf_counter() - start
    problems = check_submission(submission, job.test_dir)
    if problems:
        raise DataError(f"{submission}: the written submission is incomplete: {problems[0]}")
    return submission, shards, inference_s


def _archive(submission: Path, archive: Path) -> Path:
    """``submission``'s files, flat, in the ``.tar.gz`` at ``archive``, written atomically (temp file, rename)."""
    with (
        tempfile.NamedTemporaryFile(dir=archive.parent, suffix=".tar.gz", delete=False) as tmpf,
        tarfile.open(fileobj=tmpf, mode="w:gz") as tar,
    ):
        for p in sorted(submission.iterdir()):
            tar.add(p, arcname=p.name)
    Path(tmpf.name).replace(archive)
    return archive


def _score(truth_dir: str | Path | None, submission: Path) -> ScoreReport | None:
    """The challenge score of ``submission`` against ``truth_dir``; None without a truth directory."""
    if truth_dir is None:
        return None
    from geopose_ray.scoring import score_dirs

    return score_dirs(truth_dir, submission)


def _track(cfg: SweepConfig, result: EnsembleResult, tta: str) -> None:
    """The ensemble's MLflow run under the sweep's parent: members, weights, factors, the out-of-fold progression
    (a table and a plot), the test score. MLflow being down never fails the job: the files are on disk."""
    fit = result.fit
    tracker = Tracker.for_sweep(cfg)
    params = {
        "members": ",".join(m.name for m in result.members),
        "method": fit.method,
        "tta": tta,
        "scale_blend": f"{fit.scale_blend:.3f}",
        **{f"weight.{m}": f"{w:.4f}" for m, w in fit.weights.items()},
        **{f"city_factor.{c}": f"{f:.4f}" for c, f in fit.city_factors.items()},
    }
    run = tracker.child("ensemble", params, "ensemble", "ensemble")
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
    if not tracker.flush(timeout_s=30):  # the submission and fit.json are written: MLflow is a record
        log.warning("MLflow unavailable for the ensemble run; fit.json is at %s", result.submission.parent)


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
    """The job's outcome as plain values (printed by ``geopose-ray sweep ensemble``, written to summary.json)."""
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

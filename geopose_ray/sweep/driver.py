"""The sweep driver: screening with the promoter on Ray Tune, then every fold for the finalists."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from geopose_ray.data.cache import TrainingCache
from geopose_ray.errors import GeoposeError
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.sweep.config import SweepConfig
from geopose_ray.sweep.promoter import Promoter
from geopose_ray.sweep.tune import MlflowCallback, PromoterScheduler, log_curves_plot, train_trial, trial_key
from geopose_ray.tracking import Tracker

log = logging.getLogger(__name__)

COLUMNS = [
    "trial", "stage", "status", "encoder", "decoder", "weights", "lr", "accumulation", "batch_size",
    "effective_batch", "val_fold", "epochs", "score", "best_score", "gpu_hours", "device_hours",
]  # fmt: skip


@dataclass
class SweepResult:
    """What a sweep produced."""

    rows: list[dict[str, Any]]  # the results table, one row per trial (screening and fold runs)
    checkpoints: dict[str, Path]  # trial (or "<trial>/fold<k>") -> its last checkpoint directory
    finalists: list[str]  # screening trial ids that reached the top rung
    table_path: Path


def _row(trial_id: str, stage: str, status: str, cfg: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    model = cfg["model"]
    return {
        "trial": trial_id,
        "stage": stage,
        "status": status,
        "encoder": model["encoder"],
        "decoder": model["decoder"],
        "weights": model.get("weights"),
        "lr": cfg["lr"],
        "accumulation": cfg["accumulation"],
        "batch_size": cfg["batch_size"],
        "effective_batch": cfg["batch_size"] * cfg["accumulation"],
        "val_fold": cfg["val_fold"],
        "epochs": int(metrics.get("epoch", 0)),
        "score": metrics.get("score"),
        "best_score": metrics.get("best_score"),
        "gpu_hours": metrics.get("gpu_hours", 0.0),
        "device_hours": metrics.get("device_hours", 0.0),
    }


def _last_line(error: Exception | None) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _outcomes(grid: Any) -> list[tuple[str, dict[str, Any], dict[str, Any], Exception | None, Path | None]]:
    """(trial key, its TrainConfig dict, last metrics, error, last checkpoint dir) per trial of a ResultGrid."""
    out = []
    for i in range(len(grid)):
        result = grid[i]
        key, cfg = trial_key(Path(result.path).name, (result.config or {}).get("cfg") or {})
        ckpt = Path(result.checkpoint.path) if result.checkpoint is not None else None
        out.append((key, cfg, dict(result.metrics or {}), result.error, ckpt))
    return out


def _tuner(
    cfg: SweepConfig, name: str, configs: list[dict[str, Any]], scheduler: Any, callbacks: list[Any], resume: bool
) -> tune.Tuner:
    trainable = tune.with_resources(train_trial, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    storage = str(Path(cfg.storage_path).resolve()) if "://" not in cfg.storage_path else cfg.storage_path
    path = f"{storage}/{name}"
    if resume and tune.Tuner.can_restore(path):
        # Finished trials keep their results; unfinished and errored ones continue from their checkpoints.
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    threads = max(1, int(cfg.cpus_per_trial))
    return tune.Tuner(
        trainable,
        param_space={"cfg": tune.grid_search([{**c, "_threads": threads} for c in configs])},
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            metric=cfg.metric,
            mode=cfg.mode,
            trial_name_creator=lambda t: f"{name}-{t.trial_id}",
            trial_dirname_creator=lambda t: t.trial_id,
            reuse_actors=True,  # a resumed or next trial skips the process start and the torch import
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def run_sweep(cfg: SweepConfig, resume: bool = False) -> SweepResult:
    """Validate, screen the grid with the promoter, train the finalists on every other fold, write the table.

    With ``resume``, a sweep whose driver was killed continues: Tune restores its trials (each from its last
    checkpoint), the promoter its state from ``promoter.json``, and MLflow runs are found again by their tags.
    """
    cfg.validate()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    promoter = Promoter(cfg.rungs, cfg.eta, cfg.mode, cfg.min_results, cfg.budget_gpu_hours)
    configs = cfg.trial_configs()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.mlflow_uri, cfg.experiment or cfg.name, cfg.name, str(cfg.out_dir / "mlartifacts"))
    try:
        tracker.parent(dataclasses.asdict(cfg))
    except Exception as e:
        log.warning("MLflow at %s unavailable (%s); the sweep runs and logs when it is back", cfg.mlflow_uri, e)
    state = cfg.out_dir / "promoter.json"
    if not resume:
        state.unlink(missing_ok=True)
    scheduler = PromoterScheduler(promoter, cfg.metric, str(state.resolve()))
    screen_callback = MlflowCallback(tracker, promoter, "screen")
    screen = _tuner(cfg, f"{cfg.name}-screen", configs, scheduler, [screen_callback], resume).fit()
    if state.exists():  # a restored Tuner has its own copy of the scheduler: its saved state is the truth
        promoter = Promoter.from_dict(json.loads(state.read_text())["promoter"])
    outcomes = _outcomes(screen)
    failed = [o for o in outcomes if o[3] is not None]
    if outcomes and len(failed) == len(outcomes):
        raise GeoposeError(
            f"all {len(outcomes)} screening trials of {cfg.name} failed; the first: {_last_line(failed[0][3])} "
            f"(details under {Path(cfg.storage_path) / (cfg.name + '-screen')})"
        )
    rows = []
    finalist_cfgs = []
    checkpoints: dict[str, Path] = {}
    for trial_id, trial_cfg, metrics, error, ckpt in outcomes:
        if ckpt is not None:
            checkpoints[trial_id] = ckpt
        if trial_id in promoter.finalists:
            status = "finalist"
            finalist_cfgs.append((trial_id, trial_cfg))
        elif error is not None:
            status = f"errored: {type(error).__name__}"
        else:
            status = "paused" if trial_id in promoter.paused else "stopped"
        rows.append(_row(trial_id, "screen", status, trial_cfg, metrics))
    folds = sorted({r.fold for r in TrainingCache(cfg.cache).rows} - {cfg.val_fold})
    fold_cfgs = [{**c, "val_fold": k, "_finalist": t} for t, c in finalist_cfgs for k in folds]
    if fold_cfgs:
        folds_grid = _tuner(
            cfg, f"{cfg.name}-folds", fold_cfgs, None, [MlflowCallback(tracker, None, "fold")], resume
        ).fit()
        for key, fc, metrics, error, ckpt in _outcomes(folds_grid):
            if ckpt is not None:
                checkpoints[key] = ckpt
            status = "done" if error is None else f"errored: {type(error).__name__}"
            rows.append(_row(key, "fold", status, fc, metrics))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    table = cfg.out_dir / "results.csv"
    atomic_write_text(table, buf.getvalue())
    try:
        tracker.artifact(tracker.parent(), table)
        log_curves_plot(
            tracker, tracker.parent(), screen_callback.curves, "screen_curves.png",
            rungs=cfg.rungs, highlight=promoter.finalists, title=f"{cfg.name}: screening (finalists bold)",
        )  # fmt: skip
        tracker.tags(tracker.parent(), {"finalists": ",".join(promoter.finalists), "trials": len(configs)})
    except Exception as e:
        log.warning("MLflow unavailable at the end of the sweep (%s); results.csv is at %s", e, table)
    if not tracker.flush(timeout_s=30):
        log.warning("%d MLflow calls could not be delivered; results.csv is at %s", tracker.pending, table)
    return SweepResult(rows, checkpoints, list(promoter.finalists), table)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results table for a terminal, best screening score first."""
    head = (
        f"{'trial':<22}{'stage':<7}{'status':<10}{'encoder':<18}{'decoder':<10}{'lr':>9}{'acc':>4}{'ep':>5}{'best':>8}"
    )
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["stage"] != "screen", -(r["best_score"] or -1e9))):
        lines.append(
            f"{r['trial']:<22}{r['stage']:<7}{r['status'][:9]:<10}{r['encoder'][:17]:<18}{r['decoder'][:9]:<10}"
            f"{r['lr']:>9.2g}{r['accumulation']:>4}{r['epochs']:>5}{(r['best_score'] or float('nan')):>8.4f}"
        )
    return "\n".join(lines)

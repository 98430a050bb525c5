"""Ray Tune glue: the scheduler that dispatches the promoter's decisions, and the trial function.

The only module (with the driver) that imports Ray. The promotion rules live in :mod:`.promoter`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.engine.trainer import LAST
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.sweep.plots import curves_plot
from geopose_ray.sweep.promoter import Decision, Promoter
from geopose_ray.tracking import Tracker


def trial_key(trial_id: str, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A trial's name in the results table and MLflow (``<screening trial>/fold<k>`` for a finalist's fold
    run), and its TrainConfig dict without the driver's private keys (``_threads``, ``_finalist``)."""
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    parent = cfg.get("_finalist")
    return (f"{parent}/fold{clean['val_fold']}" if parent else trial_id), clean


class PromoterScheduler(FIFOScheduler):
    """A Ray Tune scheduler that asks a :class:`Promoter`: CONTINUE, PAUSE (checkpointed) or STOP (a finalist).

    New trials run first; then paused trials the promoter names, which Tune resumes from their last
    checkpoint. When nothing runs or waits, the rungs are closed and whatever can never be promoted is
    stopped, so the sweep ends.
    """

    def __init__(self, promoter: Promoter, metric: str = "score", state_path: str | None = None) -> None:
        super().__init__()
        self.promoter = promoter
        self._score_key = metric
        self._resume: list[str] = []  # promoted, not yet running again
        self.state_path = state_path  # the promoter's state, rewritten after every change (Tune keeps none)

    def _save(self) -> None:
        if self.state_path:
            state = {"promoter": self.promoter.to_dict(), "resume": self._resume}
            atomic_write_text(self.state_path, json.dumps(state))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the sweep started; the saved state is newer.
        # The promoter is updated in place: the MLflow callback holds the same object.
        self.__dict__.update(state)
        if self.state_path and Path(self.state_path).exists():
            saved = json.loads(Path(self.state_path).read_text())
            self.promoter.__dict__.update(Promoter.from_dict(saved["promoter"]).__dict__)
            self._resume = list(saved["resume"])

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        value = result.get(self._score_key, math.nan)
        decision = self.promoter.on_result(
            trial.trial_id, int(result["epoch"]), float(value), float(result.get("gpu_hours", 0.0))
        )
        self._save()
        if decision is Decision.CONTINUE:
            return TrialScheduler.CONTINUE
        if decision is Decision.FINALIST:
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = tune_controller.get_trials()
        # After a driver restart Tune may bring a paused trial back as PENDING: it still waits for promotion.
        waiting = {
            t.trial_id: t
            for t in trials
            if t.status == Trial.PAUSED
            or (t.status == Trial.PENDING and t.trial_id in self.promoter.paused and t.trial_id not in self._resume)
        }
        for trial in trials:
            if trial.status == Trial.PENDING and trial.trial_id not in waiting:
                if trial.trial_id in self._resume:
                    self._resume.remove(trial.trial_id)
                    self._save()
                return trial
        changed = False
        for trial_id in self.promoter.promotable():
            if trial_id in waiting:
                self.promoter.promote(trial_id)
                self._resume.append(trial_id)
                changed = True
        if not self._resume and not any(t.status == Trial.RUNNING for t in trials):
            self._resume += [t for t in self.promoter.close() if t in waiting]
            changed = True
            if not self._resume:
                for trial in waiting.values():  # can never be promoted: end them so the sweep finishes
                    tune_controller.stop_trial(trial)
        while self._resume:
            trial_id = self._resume.pop(0)
            changed = True
            if trial_id in waiting:
                self._save()
                return waiting[trial_id]
        if changed:
            self._save()
        return None

    def debug_string(self) -> str:
        p = self.promoter
        sizes = [len(p.results[i]) for i in range(len(p.rungs))]
        return (
            f"Promoter: rungs {p.rungs}, results per rung {sizes}, paused {len(p.paused)}, finalists {len(p.finalists)}"
        )


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one TrainConfig, reporting every epoch with a checkpoint and
    resuming from Tune's checkpoint when the trial is resumed or restarted."""
    torch.set_num_threads(max(1, int(config["cfg"].get("_threads", 1))))
    _, config = trial_key("", config["cfg"])
    cfg = TrainConfig.from_dict(config)
    work = Path(tempfile.mkdtemp(prefix="geopose-trial-"))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copy(Path(d) / LAST, work / LAST)
    devices = max(1.0, float(torch.cuda.device_count())) if cfg.device != "cpu" and torch.cuda.is_available() else 0.0

    def report(metrics: dict[str, float], last: Path) -> None:
        seconds = sum(h.get("train_s", 0.0) for h in trainer.history)
        out = dict(metrics)
        out["gpu_hours"] = seconds / 3600.0 * devices
        out["device_hours"] = seconds / 3600.0
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(last.parent)))

    trainer = Trainer(cfg, work, on_epoch=report)
    try:
        trainer.fit()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class MlflowCallback(Callback):
    """Logs every trial to MLflow from the driver: a child run per trial under the sweep's parent run,
    metrics each epoch in one batch, and tags (stage, rung, status) that follow the promoter's decisions.

    Results that arrive while the server is down are kept per trial and sent when it is back.
    """

    def __init__(self, tracker: Tracker, promoter: Promoter | None, stage: str) -> None:
        self.tracker = tracker
        self.promoter = promoter
        self.stage = stage
        self._waiting: dict[str, list[tuple[dict[str, float], int]]] = {}
        self.curves: dict[str, list[tuple[int, float]]] = {}  # trial key -> (epoch, score), for the plots

    def _key(self, trial: Trial) -> tuple[str, dict[str, Any]]:
        return trial_key(trial.trial_id, trial.config.get("cfg") or {})

    def _status(self, trial: Trial) -> dict[str, Any]:
        p = self.promoter
        if p is None:
            return {"status": "running"}
        tid = trial.trial_id
        rung = max((i + 1 for i, results in p.results.items() if tid in results), default=0)
        if tid in p.finalists:
            status = "finalist"
        elif tid in p.paused:
            status = "paused"
        elif any(tid in promoted for promoted in p.promoted.values()):
            status = "promoted"
        else:
            status = "running"
        return {"status": status, "rung": rung}

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        key, cfg = self._key(trial)
        numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        waiting = self._waiting.setdefault(key, [])
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        waiting.append((numbers, epoch))
        if isinstance(result.get("score"), int | float):
            self.curves.setdefault(key, []).append((epoch, float(result["score"])))
        run = self.tracker.trial(key, cfg, self.stage)
        if run is None:
            return  # the server is down: keep the epoch, send it with the next one
        for metrics, step in waiting:
            self.tracker.metrics(run, metrics, step)
        waiting.clear()
        self.tracker.tags(run, {**self._status(trial), "stage": self.stage})

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        run = self.tracker.trial(key, cfg, self.stage)
        if run is not None:
            status = self._status(trial)
            if status["status"] == "running":
                status["status"] = "done" if self.stage == "fold" else "stopped"
            self.tracker.tags(run, status)
            self._plot(run, key)
            self.tracker.finish(run)

    def _plot(self, run: str, key: str) -> None:
        rungs = self.promoter.rungs if self.promoter is not None else ()
        log_curves_plot(
            self.tracker, run, {key: self.curves.get(key, [])}, "learning_curve.png", rungs=rungs, title=key
        )

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        run = self.tracker.trial(key, cfg, self.stage)
        if run is not None:
            reason = _error_reason(trial)
            self.tracker.tags(run, {"status": "errored", "error": reason})
            self.tracker.finish(run, failed=True)


def log_curves_plot(
    tracker: Tracker, run: str, curves: dict[str, list[tuple[int, float]]], name: str, **kw: Any
) -> None:
    """Log a learning-curve plot as an artifact of ``run``; a plotting failure never stops a sweep."""
    try:
        with tempfile.TemporaryDirectory() as d:
            tracker.artifact(run, curves_plot(curves, Path(d) / name, **kw))
    except Exception:
        return


def _error_reason(trial: Trial) -> str:
    """The last line of a trial's error (its exception), for the run's ``error`` tag."""
    path = trial.error_file
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1][:500] if lines else "unknown error"

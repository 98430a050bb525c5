"""The sweep driver: screening with the promoter on Ray Tune, then every fold for the finalists; and reopening
a finished sweep with a larger budget or another rung.

What a sweep leaves in ``<storage_path>/<name>/`` (on the object store for cloud storage: see
:mod:`~geopose_ray.sweep.files`): ``results.csv`` (the results table), ``promoter.json`` (the promoter's state)
and ``trials.json`` (every trial's config, last metrics and checkpoint directory, the record ``sweeps/promote.py``
and the ensemble read). Tune's own experiments sit beside it, one per stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from geopose_ray.cluster import tune_state
from geopose_ray.cluster.callback import MlflowCallback
from geopose_ray.cluster.connect import connect
from geopose_ray.cluster.faults import KillAfterResult
from geopose_ray.cluster.replay import newest
from geopose_ray.cluster.restore import restoring_into
from geopose_ray.cluster.scheduler import PromoterScheduler
from geopose_ray.cluster.search import GuidedSearch, fold_queue, pending_trials
from geopose_ray.cluster.trainable import train_trial
from geopose_ray.data.cache import TrainingCache
from geopose_ray.errors import ConfigError, DataError, GeoposeError
from geopose_ray.storage import checkpoint_location, is_remote, join, redact, storage_errors
from geopose_ray.sweep.config import SweepConfig
from geopose_ray.sweep.files import PROMOTER, STATE, TRIALS
from geopose_ray.sweep.promoter import Promoter
from geopose_ray.sweep.records import (
    EPOCH_HOURS,
    Stage,
    Status,
    SweepRecords,
    TrialKey,
    TrialRecord,
    per_epoch_hours,
    resolve_config,
    trial_key,
)
from geopose_ray.sweep.table import SweepTable, format_results, result_row, sort_rows
from geopose_ray.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What a sweep produced."""

    rows: list[dict[str, Any]]  # the results table, one row per trial (screening and fold runs)
    checkpoints: dict[str, str]  # trial (or "<trial>/fold<k>") -> its last checkpoint directory (a path or URI)
    finalists: list[str]  # screening trial ids that reached the top rung
    table_path: Path
    held_back: list[str] = dataclasses.field(default_factory=list)  # would be promoted but for the spent budget

    def report(self) -> str:
        """The results table and where it is, as the entry scripts print it."""
        text = f"{format_results(self.rows)}\nfinalists: {self.finalists}\nresults table: {self.table_path}"
        if self.held_back:
            text += f"\n{held_back_note(self.held_back)}"
        return text


def held_back_note(trials: list[str]) -> str:
    return (
        f"held back by the spent budget: {len(trials)} paused trial(s) qualify for promotion ({', '.join(trials)}); "
        "`python sweeps/promote.py --config <sweep yaml> --budget <more GPU-hours>` continues them from their "
        "checkpoints"
    )


def _last_line(error: Exception | None) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _records(grid: Any, storage_path: str, restored: bool = False) -> dict[str, TrialRecord]:
    """A record per trial of a ResultGrid that reported at least once or failed, in the stage its key names (a
    fold run backfilled during screening is a fold run); checkpoints by their location on ``storage_path``.
    ``restored``: the grid's Tuner was restored after a killed driver, whose trials may have checkpoints Tune lost
    track of."""
    out: dict[str, TrialRecord] = {}
    for i in range(len(grid)):
        result = grid[i]
        params = result.config or (_params(result) if restored else {})
        key, cfg = trial_key(Path(result.path).name, resolve_config(params))
        ckpt = None
        if result.checkpoint is not None:
            ckpt = checkpoint_location(result.checkpoint.filesystem, result.checkpoint.path, storage_path)
        reported = result.metrics or {}
        if "epoch" not in reported and restored and params:
            # Tune lost the trial's results (a driver killed after the trial's first checkpoint, before Tune's
            # files caught up, then restored): what it reported with its latest checkpoint on storage.
            found = newest(result.filesystem, result.path)
            if found is not None:
                ckpt, reported = checkpoint_location(result.filesystem, found.path, storage_path), found.metrics
        metrics = {k: v for k, v in reported.items() if isinstance(v, int | float | str)}
        if "epoch" not in metrics and result.error is None:
            continue  # never ran (a paused trial that was not promoted in a reopened sweep)
        error = _last_line(result.error) if result.error is not None else None
        out[key] = TrialRecord(key, key.stage, cfg, metrics, ckpt, error)
    return out


def _params(result: Any) -> dict[str, Any]:
    """A trial's config as Tune wrote it when the trial started (``params.json``), for a result whose metrics
    (which carry the config) were lost; empty if it cannot be read."""
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            params = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def _can_restore(path: str) -> bool:
    """Tune has an experiment at ``path`` to restore (an error reaching its storage is a clear one, without the
    storage's credentials)."""
    try:
        return bool(tune.Tuner.can_restore(path))
    except storage_errors() as e:
        raise DataError(f"{redact(path)}: cannot look for the sweep's experiment there ({redact(str(e))})") from e


def _tuner(
    cfg: SweepConfig,
    name: str,
    configs: list[dict[str, Any]] | None,
    scheduler: Any,
    callbacks: list[Any],
    resume: bool,
    guided: bool = False,
) -> tune.Tuner:
    """A Tuner over ``configs`` (a grid; in a guided order with ``search: guided``), or over the sweep's axes drawn
    by Optuna's TPE (``configs`` None)."""
    trainable = tune.with_resources(train_trial, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    storage = str(Path(cfg.storage_path).resolve()) if "://" not in cfg.storage_path else cfg.storage_path
    path = join(storage, name)  # a URI's query (an endpoint, say) stays at its end
    if resume and not is_remote(path) and Path(path).is_dir():
        tune_state.mend(path)  # a torn state file, left by a driver killed while Tune copied it, is not restored
    if resume and _can_restore(path):
        # Finished trials keep their results; unfinished and errored ones continue from their checkpoints.
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    private: dict[str, Any] = {"_threads": max(1, int(cfg.cpus_per_trial)), "_gpus": cfg.gpus_per_trial}
    if cfg.faults:
        private["_faults"] = dict(cfg.faults)
    search_alg: Any = None
    num_samples = 1
    if configs is None:  # a searcher draws the trials
        g = cfg.grid
        space: dict[str, Any] = {
            "sweep": dataclasses.asdict(cfg),
            "private": private,
            "sample": {
                "encoder": tune.choice(g.encoders),
                "decoder": tune.choice(g.decoders),
                "lr": tune.loguniform(*cfg.lr_range) if cfg.lr_range else tune.choice(g.lrs),
                "accumulation": tune.choice(g.accumulation),
                # An index into each named axis's values (per encoder, as many for every encoder).
                "axes": {a: tune.choice(list(range(len(g.axis_values(a, g.encoders[0]))))) for a in g.axes},
            },
        }
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=TPESampler(seed=cfg.search_seed))
        num_samples = cfg.num_samples
    elif guided:
        points = [{**c, **private} for c in configs]
        folds = cfg.fold_run_folds(sorted({r.fold for r in TrainingCache(cfg.cache).rows}))
        search_alg = GuidedSearch(
            points, cfg.rungs[0], cfg.search_seed, cfg.metric, cfg.mode, folds, cfg.rungs[-1], axes=cfg.axes,
            top_k=cfg.fold_top_k,
        )  # fmt: skip
        space, num_samples = {}, -1  # the searcher says when it is done (grid points, then fold runs)
    else:
        space = {"cfg": tune.grid_search([{**c, **private} for c in configs])}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            metric=cfg.metric,
            mode=cfg.mode,
            trial_name_creator=lambda t: f"{name}-{t.trial_id}",
            # Named as in the results table and MLflow (a fold run's "/" becomes "-").
            trial_dirname_creator=lambda t: trial_key(t.trial_id, resolve_config(t.config or {}))[0].replace("/", "-"),
            reuse_actors=True,  # a resumed or next trial skips the process start and the torch import
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=2),
            # One checkpoint per trial: Tune removes the previous one only once the new one is registered.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
            verbose=0,
        ),
    )


class _Sweep:
    """The state one driver run shares between its stages: Ray, MLflow, the table, the promoter, the records."""

    def __init__(self, cfg: SweepConfig, promoter: Promoter, records: dict[str, TrialRecord], round_: int) -> None:
        self.cfg = cfg
        self.promoter = promoter
        self.records = records
        self.round = round_  # 0 for the sweep itself, n for its n-th reopening
        connect()
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker.for_sweep(cfg)
        # The sweep's config as the parent run's params; credentials in a storage or tracking URI stay out.
        shown = {
            "storage_path": redact(cfg.storage_path),
            "tracking_uri": cfg.tracking_uri and redact(cfg.tracking_uri),
        }
        self.tracker.parent({**dataclasses.asdict(cfg), **shown})
        self.files = cfg.files
        self.table = SweepTable(self.files, list(cfg.rungs), cfg.name, axes=cfg.axes)
        for row in self.rows():
            self.table.rows[row["trial"]] = row

    def _suffix(self) -> str:
        return f"-{self.round}" if self.round else ""

    def screen(self, configs: list[dict[str, Any]] | None, resume: bool, name: str, guided: bool = False) -> None:
        """Run screening trials under the promoter (``configs`` in a guided order if ``guided``; None: Optuna draws
        them); records and promoter state are updated from the result."""
        scheduler = PromoterScheduler(self.promoter, self.cfg.metric, self.files, self.cfg.preempt_fold_runs)
        callbacks: list[Any] = [MlflowCallback(self.tracker, self.promoter, Stage.SCREEN, self.table)]
        if "kill_after_result" in self.cfg.faults:
            callbacks.append(KillAfterResult(int(self.cfg.faults["kill_after_result"])))
        pending = pending_trials(self.cfg.pending_trials if guided or configs is None else None)
        with pending, restoring_into(self.files, self.tracker, self.table, self.cfg.preempt_fold_runs):
            grid = _tuner(self.cfg, name, configs, scheduler, callbacks, resume, guided).fit()
        # A restored Tuner has its own copy of the scheduler: the state it saved rules. Its last save reaches
        # the sweep's home now, if one while it ran did not.
        saved = self.files.working_copy(PROMOTER)
        unstarted: dict[str, dict[str, Any]] = {}
        if saved is not None:
            state = json.loads(saved)
            self.promoter = Promoter.from_dict(state["promoter"])
            unstarted = state.get("unstarted", {})
            self.files.write(PROMOTER, saved)
        found = _records(grid, self.cfg.storage_path, restored=resume)
        for key, cfg in unstarted.items():  # beyond the budget: recorded (stopped), for a reopened sweep to start
            if key not in found:
                found[key] = TrialRecord(TrialKey(key), Stage.SCREEN, cfg, {}, None)
        failed = [r for r in found.values() if r.error is not None]
        if found and len(failed) == len(found) and not self.round:
            raise GeoposeError(
                f"all {len(found)} screening trials of {self.cfg.name} failed; the first: {failed[0].error} "
                f"(details under {redact(join(self.cfg.storage_path, name))})"
            )
        self.records.update(found)

    def folds(self, resume: bool) -> None:
        """Train each finalist (the best ``fold_runs.top_k`` by their top-rung score) on every other fold (or
        ``fold_runs.folds``), to the top rung; a fold run that exists continues from its checkpoint (a reopened
        sweep with a higher top rung), one that is complete is left alone."""
        top = self.cfg.rungs[-1]
        folds = self.cfg.fold_run_folds(sorted({r.fold for r in TrainingCache(self.cfg.cache).rows}))
        todo = []
        for t in self.promoter.ranked_finalists()[: self.cfg.fold_top_k]:
            for k in folds:
                key = TrialKey.fold_of(t, k)
                done = self.records.get(key)
                if done is not None and done.error is None and int(done.metrics.get("epoch", 0)) >= top:
                    continue
                hours = per_epoch_hours(self.records[t].metrics)
                fold_cfg = {**self.records[t].cfg, "val_fold": k, "epochs": top, "_finalist": t, EPOCH_HOURS: hours}
                if done is not None and done.checkpoint:
                    fold_cfg["_resume_from"] = done.checkpoint
                todo.append(fold_cfg)
        if not todo:
            return
        todo = fold_queue(todo)  # the dispatch policy's order: the Tuner starts them in it
        callback = MlflowCallback(self.tracker, None, Stage.FOLD, self.table)
        with restoring_into(self.files, self.tracker, self.table):
            grid = _tuner(self.cfg, f"{self.cfg.name}-folds{self._suffix()}", todo, None, [callback], resume).fit()
        self.records.update(_records(grid, self.cfg.storage_path, restored=resume))

    def status(self, rec: TrialRecord) -> Status:
        """A trial's status once its stage has finished."""
        if rec.stage == Stage.FOLD:
            return Status.DONE if rec.error is None else Status.ERRORED
        if rec.key in self.promoter.finalists:
            return Status.FINALIST
        if rec.error is not None:
            return Status.ERRORED
        return Status.PAUSED if rec.key in self.promoter.paused else Status.STOPPED

    def rows(self) -> list[dict[str, Any]]:
        return [
            result_row(r.key, r.stage, self.status(r), self.promoter.reached(r.key) if r.stage == Stage.SCREEN else "",
                       r.cfg, r.metrics, self.cfg.axes)
            for r in self.records.values()
        ]  # fmt: skip

    def finish(self) -> SweepResult:
        """Write trials.json and the results table, to disk and to the parent run."""
        records = SweepRecords(
            self.cfg.name, self.round, list(self.cfg.rungs), list(self.promoter.finalists), dict(self.records)
        )
        self.files.write(TRIALS, records.to_json())
        rows = sort_rows(self.rows())  # with each finalist's mean over its folds
        self.table.rows = {r["trial"]: r for r in rows}
        self.table.finalists = list(self.promoter.finalists)
        self.table.write(self.tracker, force=True)
        parent = self.tracker.parent()
        spent = self.promoter.spent_gpu_hours
        self.tracker.tags(
            parent,
            {"finalists": ",".join(self.promoter.finalists), "trials": len(self.records),
             "gpu_hours": f"{spent:.3f}", "budget_gpu_hours": self.promoter.budget_gpu_hours, "round": self.round},
        )  # fmt: skip
        lat = sorted(self.tracker.latencies)
        if lat:  # the cost of tracking, as this driver saw it
            self.tracker.metrics(
                parent,
                {"mlflow_calls": len(lat), "mlflow_latency_median_ms": 1000 * lat[len(lat) // 2],
                 "mlflow_latency_p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))]},
                self.round,
            )  # fmt: skip
        if not self.tracker.flush(timeout_s=30):  # what an outage kept back goes now, if the server is back
            n = self.tracker.pending
            log.warning("%d MLflow calls could not be delivered; results.csv is at %s", n, self.table.path)
        checkpoints = {k: r.checkpoint for k, r in self.records.items() if r.checkpoint}
        held = self.promoter.held_back()
        if held:
            log.warning(held_back_note(held))
        return SweepResult(rows, checkpoints, list(self.promoter.finalists), self.table.path, held)


def run_sweep(cfg: SweepConfig, resume: bool = False) -> SweepResult:
    """Validate, screen the grid with the promoter, train the finalists on every other fold, write the table.

    With ``resume``, a sweep whose driver was killed continues: Tune restores its trials (each from its last
    checkpoint), the promoter its state from ``promoter.json``, and MLflow runs are found again by their tags.
    """
    cfg.validate()
    cfg.refuse_outputs_in_job_copy()
    if resume:
        cfg.files.pull()  # the state as the last driver left it, on whichever head that was
    else:
        cfg.files.remove(STATE)
    sweep = _Sweep(cfg, Promoter(cfg.rungs, cfg.eta, cfg.mode, cfg.min_results, cfg.budget_gpu_hours), {}, 0)
    configs = cfg.trial_configs() if cfg.search != "optuna" else None
    sweep.screen(configs, resume, f"{cfg.name}-screen", guided=cfg.search == "guided")
    sweep.folds(resume)
    return sweep.finish()


def load_records(cfg: SweepConfig) -> tuple[SweepRecords, Promoter]:
    """A finished sweep's trial records and promoter, as the sweep's home has them (a working copy here that
    never reached it goes up first).

    Raises:
        GeoposeError: there is no finished sweep; DataError: its trials.json is malformed.
    """
    files = cfg.files
    files.pull()  # the working copies are now the home's files
    trials, promoter = files.working_copy(TRIALS), files.working_copy(PROMOTER)
    if trials is None or promoter is None:
        raise GeoposeError(
            f"no finished sweep {cfg.name!r} under {redact(files.home)} ({TRIALS} or {PROMOTER} missing): run "
            "sweeps/screen.py first, or sweeps/screen.py --resume if its driver stopped"
        )
    records = SweepRecords.from_json(trials, redact(files.location(TRIALS)))
    return records, Promoter.from_dict(json.loads(promoter)["promoter"])


def reopen_sweep(cfg: SweepConfig, budget_gpu_hours: float | None = None, add_rung: int | None = None) -> SweepResult:
    """Continue a finished sweep: with a larger GPU-hour budget, paused trials that now qualify are promoted and
    the grid points the budget never started start (as far as it affords them); with another rung (more epochs
    than the top one), the top rung's best 1/η go on to it. Trials resume from their last checkpoints (no epoch
    is retrained), keep their MLflow runs, and the new finalists get their fold runs (existing fold runs
    continue to the new top rung)."""
    cfg.refuse_outputs_in_job_copy()
    saved, promoter = load_records(cfg)
    cfg = dataclasses.replace(
        cfg, rungs=list(saved.rungs or promoter.rungs), budget_gpu_hours=promoter.budget_gpu_hours
    )
    if budget_gpu_hours is not None:
        if budget_gpu_hours <= promoter.spent_gpu_hours:
            raise ConfigError(
                f"The value of `budget` is {budget_gpu_hours} GPU-hours, but the sweep has already spent "
                f"{promoter.spent_gpu_hours:.3f}: give a larger budget"
            )
        promoter.budget_gpu_hours = budget_gpu_hours
        cfg = dataclasses.replace(cfg, budget_gpu_hours=budget_gpu_hours)
    if add_rung is not None:
        promoter.add_rung(add_rung)
        cfg = dataclasses.replace(cfg, rungs=list(promoter.rungs))
    if budget_gpu_hours is None and add_rung is None:
        raise ConfigError("nothing to reopen the sweep for: give a larger budget, another rung, or both")
    cfg.validate()
    records = saved.trials
    sweep = _Sweep(cfg, promoter, records, saved.round + 1)
    sweep.files.write(PROMOTER, json.dumps({"promoter": promoter.to_dict(), "resume": []}))
    waiting = [t for t in promoter.paused if t in records and records[t].checkpoint]
    configs = [
        {**records[t].cfg, "epochs": cfg.rungs[-1], "_trial": t, "_resume_from": records[t].checkpoint} for t in waiting
    ]
    if budget_gpu_hours is not None:  # grid points the smaller budget never started start now, if it affords them
        configs += [
            {**r.cfg, "epochs": cfg.rungs[-1], "_trial": t}
            for t, r in records.items()
            if r.stage == Stage.SCREEN and not r.checkpoint and r.error is None and promoter.reached(t) == 0
        ]
    if configs:
        sweep.screen(configs, False, f"{cfg.name}-screen{sweep._suffix()}")
    sweep.folds(False)
    return sweep.finish()

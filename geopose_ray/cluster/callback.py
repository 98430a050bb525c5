"""The MLflow callback: a child run per trial under the sweep's parent run, kept in step with the promoter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from geopose_ray.cluster.restore import _RESTORING
from geopose_ray.cluster.scheduler import _pid
from geopose_ray.sweep.promoter import Promoter
from geopose_ray.sweep.records import Stage, Status, TrialKey, is_fold_run, resolve_config, trial_key
from geopose_ray.sweep.table import SweepTable, log_curves_plot, result_row
from geopose_ray.tracking import Run, Tracker


class MlflowCallback(Callback):
    """Logs every trial to MLflow from the driver: a child run per trial under the sweep's parent run,
    metrics each epoch in one batch, and tags (stage, rung, status) that follow the promoter's decisions;
    keeps the sweep's :class:`SweepTable` current.

    What cannot be sent while the server is down (a trial's run not yet created, its epochs, its tags, its end)
    waits in the tracker's queue and is sent, in order and once, when the server is back
    (:class:`~geopose_ray.tracking.Tracker`).
    """

    def __init__(self, tracker: Tracker, promoter: Promoter | None, stage: str, table: SweepTable) -> None:
        self.tracker = tracker
        self.promoter = promoter
        self.stage = Stage(stage)  # the stage of its Tuner's trials, but for fold runs backfilled during screening
        self.table = table
        self._last: dict[str, dict[str, Any]] = {}  # trial key -> its last result

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Restored by Tune from an earlier driver's pickle: log through this driver's client into its table.
        self.__dict__.update(state)
        if _RESTORING:
            driver = _RESTORING[-1]
            self.tracker = driver.tracker if driver.tracker is not None else self.tracker
            self.table = driver.table if driver.table is not None else self.table

    def _key(self, trial: Trial) -> tuple[TrialKey, dict[str, Any]]:
        return trial_key(trial.trial_id, resolve_config(trial.config or {}))

    def _stage(self, key: TrialKey) -> Stage:
        """The callback's stage, except for a finalist's fold run started during screening (backfilled)."""
        return Stage.FOLD if key.is_fold_run else self.stage

    def _run(self, key: TrialKey, cfg: dict[str, Any]) -> Run:
        return self.tracker.trial(key, cfg, self._stage(key))

    def _status(self, trial: Trial) -> dict[str, Any]:
        p, key = self.promoter, TrialKey.parse(_pid(trial))
        if p is None or key.is_fold_run:
            return {"status": Status.RUNNING}
        return {"status": Status(p.status(key)), "rung": p.reached(key)}

    def _row(self, key: TrialKey, cfg: dict[str, Any], status: dict[str, Any]) -> None:
        self.table.rows[key] = result_row(
            key, self._stage(key), status["status"], status.get("rung", ""), cfg, self._last.get(key, {}),
            self.table.axes,
        )  # fmt: skip
        if self.promoter is not None:
            self.table.finalists = list(self.promoter.finalists)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        key, cfg = self._key(trial)
        run = self._run(key, cfg)
        numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        numbers.pop("replayed", None)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        # An epoch reported again after a restore (train_trial's _replay) is logged once: it was not trained again.
        if not (result.get("replayed") and any(e == epoch for e, _ in self.table.curves.get(key, []))):
            self.tracker.metrics(run, numbers, epoch)
            if isinstance(result.get("score"), int | float):
                self.table.curves.setdefault(key, []).append((epoch, float(result["score"])))
        self._last[key] = numbers
        status = self._status(trial)
        before = self.table.rows.get(key, {}).get("status")
        self._row(key, cfg, status)
        if status["status"] in (Status.PAUSED, Status.FINALIST) or status["status"] != before:  # or running again
            self.table.write(self.tracker)
        tags = {**status, "stage": self._stage(key)}
        if result.get("oom_retry"):
            tags["oom_retry"] = f"out of memory: retried at batch {result['batch_size']} x {result['accumulation']}"
        self.tracker.tags(run, tags)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        """A fold run the scheduler paused for a costlier one (pre-emption) shows as paused, in the table and its
        run's tags, until it reports again. Tune pauses it after the result that asked for the pause, so it is
        seen here, at the end of a step of Tune's loop."""
        paused = False
        for trial in trials:
            if trial.status != Trial.PAUSED or not is_fold_run(_pid(trial)):
                continue
            if self.table.rows.get(_pid(trial), {}).get("status") != Status.RUNNING:
                continue
            key, cfg = self._key(trial)
            self._row(key, cfg, {"status": Status.PAUSED})
            self.tracker.tags(self._run(key, cfg), {"status": Status.PAUSED})
            paused = True
        if paused:
            self.table.write(self.tracker)
        else:
            self.table.catch_up(self.tracker)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        status = self._status(trial)
        if status["status"] == Status.RUNNING:
            status["status"] = Status.DONE if self._stage(key) == Stage.FOLD else Status.STOPPED
        self._row(key, cfg, status)
        self.table.write(self.tracker)
        self._end(key, cfg, status, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        self._row(key, cfg, {"status": Status.ERRORED})
        self.table.write(self.tracker)
        self._end(key, cfg, {"status": Status.ERRORED, "error": _error_reason(trial)}, failed=True)

    def _end(self, key: TrialKey, cfg: dict[str, Any], tags: dict[str, Any], failed: bool) -> None:
        """A trial's last tags, its learning curve and the end of its run."""
        run = self._run(key, cfg)
        self.tracker.tags(run, tags)
        rungs = self.promoter.rungs if self.promoter is not None else ()
        log_curves_plot(
            self.tracker, run, {key: self.table.curves.get(key, [])}, "learning_curve.png", rungs=rungs, title=key
        )
        self.tracker.finish(run, failed=failed)


def _error_reason(trial: Trial) -> str:
    """The last line of a trial's error (its exception), for the run's ``error`` tag."""
    path = trial.error_file
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1][:500] if lines else "unknown error"

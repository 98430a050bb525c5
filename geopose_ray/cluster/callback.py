"""The MLflow callback: a child run per trial under the sweep's parent run, kept in step with the promoter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from geopose_ray.cluster.restore import _RESTORING
from geopose_ray.cluster.scheduler import _pid
from geopose_ray.sweep.promoter import Promoter
from geopose_ray.sweep.records import is_fold_run, resolve_config, trial_key
from geopose_ray.sweep.table import SweepTable, log_curves_plot
from geopose_ray.tracking import Tracker, result_row


class MlflowCallback(Callback):
    """Logs every trial to MLflow from the driver: a child run per trial under the sweep's parent run,
    metrics each epoch in one batch, and tags (stage, rung, status) that follow the promoter's decisions;
    keeps the sweep's :class:`SweepTable` current.

    What cannot be sent while the server is down (a trial's run not yet created, its epochs, its tags, its end)
    is kept per trial and sent, in order and once, at the next result of any trial or at :meth:`flush`.
    """

    def __init__(self, tracker: Tracker, promoter: Promoter | None, stage: str, table: SweepTable) -> None:
        self.tracker = tracker
        self.promoter = promoter
        self.stage = stage
        self.table = table
        self._waiting: dict[str, list[tuple[dict[str, float], int]]] = {}  # epochs not yet sent, per trial
        self._tags: dict[str, dict[str, Any]] = {}  # tags not yet sent
        self._end: dict[str, bool] = {}  # trial -> failed, for runs to end once their data is sent
        self._cfgs: dict[str, dict[str, Any]] = {}
        self._last: dict[str, dict[str, Any]] = {}  # trial key -> its last result

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Restored by Tune from an earlier driver's pickle: log through this driver's client into its table.
        self.__dict__.update(state)
        if _RESTORING:
            driver = _RESTORING[-1]
            self.tracker = driver.tracker if driver.tracker is not None else self.tracker
            self.table = driver.table if driver.table is not None else self.table
            driver.callbacks.append(self)

    def _key(self, trial: Trial) -> tuple[str, dict[str, Any]]:
        return trial_key(trial.trial_id, resolve_config(trial.config or {}))

    def _stage(self, key: str) -> str:
        """The callback's stage, except for a finalist's fold run started during screening (backfilled)."""
        return "fold" if is_fold_run(key) else self.stage

    def _status(self, trial: Trial) -> dict[str, Any]:
        p = self.promoter
        if p is None or is_fold_run(_pid(trial)):
            return {"status": "running"}
        return {"status": p.status(_pid(trial)), "rung": p.reached(_pid(trial))}

    def _row(self, key: str, cfg: dict[str, Any], status: dict[str, Any]) -> None:
        self.table.rows[key] = result_row(
            key, self._stage(key), status["status"], status.get("rung", ""), cfg, self._last.get(key, {})
        )
        if self.promoter is not None:
            self.table.finalists = list(self.promoter.finalists)

    def _deliver(self, key: str) -> bool:
        """Send what is pending for one trial; False while the server is down."""
        run = self.tracker.trial(key, self._cfgs[key], self._stage(key))
        if run is None:
            return False
        waiting = self._waiting.get(key, [])
        for metrics, step in waiting:
            self.tracker.metrics(run, metrics, step)
        waiting.clear()
        if self._tags.get(key):
            self.tracker.tags(run, self._tags.pop(key))
        if key in self._end:
            self._plot(run, key)
            self.tracker.finish(run, failed=self._end.pop(key))
        return True

    @property
    def pending(self) -> bool:
        """Something is kept back for a server that was down."""
        return any(self._waiting.values()) or any(self._tags.values()) or bool(self._end)

    def flush(self) -> None:
        """Send whatever is pending for every trial (stops at the first trial the server does not take)."""
        for key in list(self._cfgs):
            if (self._waiting.get(key) or self._tags.get(key) or key in self._end) and not self._deliver(key):
                return

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        key, cfg = self._key(trial)
        self._cfgs[key] = cfg
        numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        numbers.pop("replayed", None)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        # An epoch reported again after a restore (train_trial's _replay) is logged once: it was not trained again.
        if not (result.get("replayed") and any(e == epoch for e, _ in self.table.curves.get(key, []))):
            self._waiting.setdefault(key, []).append((numbers, epoch))
            if isinstance(result.get("score"), int | float):
                self.table.curves.setdefault(key, []).append((epoch, float(result["score"])))
        self._last[key] = numbers
        status = self._status(trial)
        before = self.table.rows.get(key, {}).get("status")
        self._row(key, cfg, status)
        if status["status"] in ("paused", "finalist") or status["status"] != before:  # paused, or running again
            self.table.write(self.tracker)
        tags = {**status, "stage": self._stage(key)}
        if result.get("oom_retry"):
            tags["oom_retry"] = f"out of memory: retried at batch {result['batch_size']} x {result['accumulation']}"
        self._tags[key] = {**self._tags.get(key, {}), **tags}
        if self._deliver(key):
            self.flush()  # the server answers: anything kept from an outage goes now

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        """A fold run the scheduler paused for a costlier one (pre-emption) shows as paused, in the table and its
        run's tags, until it reports again. Tune pauses it after the result that asked for the pause, so it is
        seen here, at the end of a step of Tune's loop."""
        paused = False
        for trial in trials:
            if trial.status != Trial.PAUSED or not is_fold_run(_pid(trial)):
                continue
            if self.table.rows.get(_pid(trial), {}).get("status") != "running":
                continue
            key, cfg = self._key(trial)
            self._cfgs[key] = cfg
            self._row(key, cfg, {"status": "paused"})
            self._tags[key] = {**self._tags.get(key, {}), "status": "paused"}
            self._deliver(key)
            paused = True
        if paused:
            self.table.write(self.tracker)
        else:
            self.table.catch_up(self.tracker)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        self._cfgs[key] = cfg
        status = self._status(trial)
        if status["status"] == "running":
            status["status"] = "done" if self._stage(key) == "fold" else "stopped"
        self._row(key, cfg, status)
        self.table.write(self.tracker)
        self._tags[key] = {**self._tags.get(key, {}), **status}
        self._end[key] = False
        self._deliver(key)

    def _plot(self, run: str, key: str) -> None:
        rungs = self.promoter.rungs if self.promoter is not None else ()
        log_curves_plot(
            self.tracker, run, {key: self.table.curves.get(key, [])}, "learning_curve.png", rungs=rungs, title=key
        )

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        key, cfg = self._key(trial)
        self._cfgs[key] = cfg
        self._row(key, cfg, {"status": "errored"})
        self.table.write(self.tracker)
        self._tags[key] = {**self._tags.get(key, {}), "status": "errored", "error": _error_reason(trial)}
        self._end[key] = True
        self._deliver(key)


def _error_reason(trial: Trial) -> str:
    """The last line of a trial's error (its exception), for the run's ``error`` tag."""
    path = trial.error_file
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1][:500] if lines else "unknown error"

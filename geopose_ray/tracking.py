"""MLflow, in one place: one experiment per sweep, a parent run per sweep, a child run per trial.

Why not Ray's ``MLflowLoggerCallback``: it makes flat runs, one per trial, and sets tags once; a sweep here
needs nested runs (sweep → trials → fold runs), runs reattached rather than duplicated when a driver
restarts, and tags that change as the promoter pauses and promotes trials. This thin layer does that.

A slow or absent tracking server never stops training: every call goes through :meth:`Tracker._call`, which
keeps what could not be sent (metrics, tags, params) in a queue and sends it, in order, on a later call or
at :meth:`Tracker.flush`. Nothing is sent twice: a batch leaves the queue only once the server accepted it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopose_ray.sweep.table import PARAM_KEYS, flatten, result_row, sort_rows, trial_params

log = logging.getLogger(__name__)


@dataclass
class Tracker:
    """MLflow runs of one sweep.

    Args:
        uri: tracking URI (``sqlite:///runs/demo/mlflow.db`` by default on the embedded default, or a server).
        experiment: the experiment (one per sweep).
        sweep: the sweep's name; its parent run is found again by this tag.
    """

    uri: str
    experiment: str
    sweep: str
    artifact_dir: str | None = None  # where a new experiment keeps artifacts (a local dir by default)
    _client: Any = None
    _experiment_id: str | None = None
    _parent: str | None = None
    _runs: dict[str, str] = field(default_factory=dict)  # trial key -> run id
    _queue: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)  # (what, call) not yet sent
    _down_since: float | None = None
    latencies: list[float] = field(default_factory=list)  # seconds per delivered call (metrics, tags, ...)

    def __post_init__(self) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast, we queue and retry ourselves
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 sends usage telemetry by default
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)

    # -- delivery -----------------------------------------------------------------------------------------

    def _call(self, what: str, call: Callable[[], Any]) -> bool:
        """Queue this call behind any undelivered ones and try to deliver them all, in order."""
        self._queue.append((what, call))
        return self._drain()

    def _drain(self) -> bool:
        """Send queued calls in order; stop at the first failure and keep it (and what follows) for later."""
        while self._queue:
            name, fn = self._queue[0]
            start = time.perf_counter()
            try:
                fn()
            except Exception as e:  # the server may be down, slow, or restarting: training goes on
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("MLflow at %s unavailable (%s: %s); queueing %s", self.uri, type(e).__name__, e, name)
                return False
            self._queue.pop(0)
            self.latencies.append(time.perf_counter() - start)
            if self._down_since is not None:
                log.warning("MLflow at %s back after %.0fs", self.uri, time.monotonic() - self._down_since)
                self._down_since = None
        return True

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Try to send everything queued; with a timeout, keep trying until it passes. True if all sent."""
        deadline = time.monotonic() + timeout_s
        while not self._drain():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- runs ---------------------------------------------------------------------------------------------

    def _experiment(self) -> str:
        if self._experiment_id is None:
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = Path(self.artifact_dir).resolve().as_uri() if self.artifact_dir else None
                self._experiment_id = self._client.create_experiment(self.experiment, artifact_location=location)
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _find(self, filter_string: str) -> str | None:
        runs = self._client.search_runs([self._experiment()], filter_string=filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def parent(self, config: Mapping[str, Any] | None = None) -> str:
        """The sweep's parent run: found again by its tag, created once."""
        if self._parent is None:
            found = self._find(f"tags.sweep = '{self.sweep}' and tags.kind = 'sweep'")
            if found is None:
                run = self._client.create_run(
                    self._experiment(), run_name=self.sweep, tags={"sweep": self.sweep, "kind": "sweep"}
                )
                found = run.info.run_id
                if config:
                    from mlflow.entities import Param

                    params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
                    self._client.log_batch(found, params=params)
            self._parent = found
        return self._parent

    def trial(self, key: str, cfg: Mapping[str, Any], stage: str) -> str | None:
        """The child run of a trial (``key`` is its id, or ``<id>/fold<k>``), created once, reattached after."""
        return self.child(key, trial_params(cfg), stage, "trial")

    def child(self, key: str, params: Mapping[str, str], stage: str, kind: str) -> str | None:
        """A child run of the sweep's parent (a trial, or the ensemble), created once and found again by its tags
        after a restart; None while the server is down."""
        if key in self._runs:
            return self._runs[key]
        try:
            parent = self.parent()
            found = self._find(f"tags.sweep = '{self.sweep}' and tags.trial = '{key}'")
            if found is None:
                from mlflow.entities import Param

                run = self._client.create_run(
                    self._experiment(),
                    run_name=key,
                    tags={"sweep": self.sweep, "trial": key, "stage": stage, "status": "running",
                          "mlflow.parentRunId": parent, "kind": kind},
                )  # fmt: skip
                found = run.info.run_id
                self._client.log_batch(found, params=[Param(k, str(v)[:500]) for k, v in params.items()])
        except Exception as e:
            log.warning("MLflow at %s unavailable (%s); %s will be logged when it is back", self.uri, e, key)
            return None
        self._runs[key] = found
        return found

    def metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """One epoch's metrics, in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k.replace("/", "_"), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and v == v  # NaN is not sent
        ]
        self._call(f"metrics of {run_id} step {step}", lambda: self._client.log_batch(run_id, metrics=batch))

    def tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(f"tags of {run_id}", lambda: self._client.log_batch(run_id, tags=batch))

    def artifact(self, run_id: str, path: str | Path) -> None:
        """Log a file as an artifact. Its bytes are read now: a queued artifact (the server is down) must not
        depend on a temporary file that is gone by the time the server is back."""
        name, data = Path(path).name, Path(path).read_bytes()

        def send() -> None:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / name).write_bytes(data)
                self._client.log_artifact(run_id, str(Path(d) / name))

        self._call(f"artifact {name}", send)

    def finish(self, run_id: str, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self._call(f"end of {run_id}", lambda: self._client.set_terminated(run_id, status))

    def runs(self) -> list[Any]:
        """Every trial run of this sweep."""
        return list(
            self._client.search_runs(
                [self._experiment()], filter_string=f"tags.sweep = '{self.sweep}' and tags.kind = 'trial'"
            )
        )


def results_table(tracker: Tracker) -> list[dict[str, Any]]:
    """The sweep's results table as the MLflow run table holds it: one row per trial run."""
    rows = []
    for run in tracker.runs():
        d = run.data
        row = result_row(d.tags.get("trial", ""), d.tags.get("stage", ""), d.tags.get("status", ""),
                         d.tags.get("rung", ""), {}, d.metrics)  # fmt: skip
        rows.append({**row, **{k: d.params.get(k, "") for k in PARAM_KEYS}})
    return sort_rows(rows)

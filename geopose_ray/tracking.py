"""MLflow, in one place: one experiment per sweep, a parent run per sweep, a child run per trial.

Why not Ray's ``MLflowLoggerCallback``: it makes flat runs, one per trial, and sets tags once; a sweep here
needs nested runs (sweep → trials → fold runs), runs reattached rather than duplicated when a driver
restarts, and tags that change as the promoter pauses and promotes trials. This thin layer does that.

A slow or absent tracking server never stops training, and no method that logs raises for it: every call goes
through :meth:`Tracker._call`, which keeps what could not be sent (a run to create, metrics, tags, artifacts, a
run's end) in one queue and sends it, in order, on a later call or at :meth:`Tracker.flush`. Nothing is sent
twice: a call leaves the queue only once the server accepted it. A run is a :class:`Run` handle, given at once
even while the server is down; its MLflow id is filled in when its creation (queued ahead of every call
against it) reaches the server.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geopose_ray.sweep.table import PARAM_KEYS, flatten, result_row, sort_rows, trial_params

if TYPE_CHECKING:
    from geopose_ray.sweep.config import SweepConfig

log = logging.getLogger(__name__)

RETRY_S = 5.0  # after a failed call, later calls only queue for this long; flush() tries at once


@dataclass(eq=True)
class Run:
    """A handle on one MLflow run of a sweep (its parent run, a trial's, the ensemble's), valid at once: calls
    against it queue behind its creation. Two handles are equal when they name the same run."""

    key: str  # what it is found again by: the sweep's name (the parent run), a trial key, "ensemble"
    id: str | None = None  # MLflow's run id, once the run is created or found on the server


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
    axes: tuple[str, ...] = ()  # the grid's named axes: a param of every trial run, a column of the table
    _client: Any = None
    _experiment_id: str | None = None
    _parent: Run | None = None
    _runs: dict[str, Run] = field(default_factory=dict)  # trial key -> its run
    _queue: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)  # (what, call) not yet sent
    _down_since: float | None = None
    _retry_at: float = 0.0  # monotonic time before which calls are queued without trying the server
    latencies: list[float] = field(default_factory=list)  # seconds per delivered call (metrics, tags, ...)

    def __post_init__(self) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast, we queue and retry ourselves
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 sends usage telemetry by default
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)

    @classmethod
    def for_sweep(cls, cfg: SweepConfig, uri: str | None = None) -> Tracker:
        """The tracker of sweep ``cfg``: its experiment (``experiment``, default its name) at ``uri`` (default the
        config's :attr:`~geopose_ray.sweep.config.SweepConfig.mlflow_uri`). A tracking server keeps artifacts where
        it was told to (its ``--artifacts-destination``); a local store (SQLite) keeps them beside the sweep, in
        ``<out_dir>/mlartifacts``."""
        uri = uri or cfg.mlflow_uri
        local = not uri.startswith(("http://", "https://"))
        artifacts = str(cfg.out_dir / "mlartifacts") if local else None
        return cls(uri, cfg.experiment or cfg.name, cfg.name, artifacts, tuple(cfg.axes))

    # -- delivery -----------------------------------------------------------------------------------------

    def _call(self, what: str, call: Callable[[], Any]) -> bool:
        """Queue this call behind any undelivered ones and try to deliver them all, in order (within
        :data:`RETRY_S` of a failure, only queue it: a server that hangs costs one timeout per interval)."""
        self._queue.append((what, call))
        return time.monotonic() >= self._retry_at and self._drain()

    def _drain(self) -> bool:
        """Send queued calls in order; stop at the first failure and keep it (and what follows) for later."""
        while self._queue:
            name, fn = self._queue[0]
            start = time.perf_counter()
            try:
                fn()
            except Exception as e:  # the server may be down, slow, or restarting: training goes on
                self._retry_at = time.monotonic() + RETRY_S
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

    def parent(self, config: Mapping[str, Any] | None = None) -> Run:
        """The sweep's parent run: found again by its tag, else created, with ``config`` (flattened) as its params,
        once the server takes it."""
        if self._parent is None:
            run = self._parent = Run(self.sweep)
            tags = {"sweep": self.sweep, "kind": "sweep"}
            params = {k: str(v)[:500] for k, v in flatten(config or {}).items()}
            self._create(run, f"tags.sweep = '{self.sweep}' and tags.kind = 'sweep'", tags, params)
        return self._parent

    def trial(self, key: str, cfg: Mapping[str, Any], stage: str) -> Run:
        """The child run of a trial (``key`` is its id, or ``<id>/fold<k>``), created once, reattached after."""
        return self.child(key, trial_params(cfg, self.axes), stage, "trial")

    def child(self, key: str, params: Mapping[str, str], stage: str, kind: str) -> Run:
        """A child run of the sweep's parent (a trial, or the ensemble), created once and found again by its tags
        after a restart. The same handle for every call with ``key``."""
        if key not in self._runs:
            parent = self.parent()
            run = self._runs[key] = Run(key)
            tags = {"sweep": self.sweep, "trial": key, "stage": stage, "status": "running", "kind": kind}
            self._create(
                run, f"tags.sweep = '{self.sweep}' and tags.trial = '{key}'", tags, dict(params), parent=parent
            )
        return self._runs[key]

    def _create(
        self, run: Run, search: str, tags: dict[str, str], params: dict[str, str], parent: Run | None = None
    ) -> None:
        """Queue finding ``run`` by ``search`` or else creating it with ``tags`` and ``params`` (under ``parent``).
        A run created whose params did not reach the server is not created again: its params are sent on the
        retry."""
        unsent: dict[str, str] = {}

        def create() -> None:
            if run.id is None:
                found = self._find(search)
                if found is None:
                    extra = {"mlflow.parentRunId": str(parent.id)} if parent is not None else {}
                    created = self._client.create_run(self._experiment(), run_name=run.key, tags={**tags, **extra})
                    unsent.update(params)
                    found = created.info.run_id
                run.id = found
            if unsent:
                from mlflow.entities import Param

                self._client.log_batch(run.id, params=[Param(k, v) for k, v in unsent.items()])
                unsent.clear()

        self._call(f"run {run.key}", create)

    def metrics(self, run: Run | str, metrics: Mapping[str, float], step: int) -> None:
        """One epoch's metrics, in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k.replace("/", "_"), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and v == v  # NaN is not sent
        ]
        self._call(f"metrics of {_name(run)} step {step}", lambda: self._client.log_batch(_id(run), metrics=batch))

    def tags(self, run: Run | str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(f"tags of {_name(run)}", lambda: self._client.log_batch(_id(run), tags=batch))

    def artifact(self, run: Run | str, path: str | Path) -> None:
        """Log a file as an artifact. Its bytes are read now: a queued artifact (the server is down) must not
        depend on a temporary file that is gone by the time the server is back.

        Raises:
            OSError: ``path`` cannot be read.
        """
        name, data = Path(path).name, Path(path).read_bytes()

        def send() -> None:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / name).write_bytes(data)
                self._client.log_artifact(_id(run), str(Path(d) / name))

        what = f"artifact {name} of {_name(run)}"
        # While the server is down only the newest copy of a file waits: the table is rewritten every 30 s.
        self._queue = [(w, c) for w, c in self._queue if w != what]
        self._call(what, send)

    def finish(self, run: Run | str, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self._call(f"end of {_name(run)}", lambda: self._client.set_terminated(_id(run), status))

    def runs(self) -> list[Any]:
        """Every trial run of this sweep."""
        return list(
            self._client.search_runs(
                [self._experiment()], filter_string=f"tags.sweep = '{self.sweep}' and tags.kind = 'trial'"
            )
        )


def _id(run: Run | str) -> str:
    """The MLflow id of a run; only called once the run's creation, queued ahead, was delivered."""
    if isinstance(run, str):
        return run
    if run.id is None:
        raise RuntimeError(f"MLflow run {run.key} not created yet")  # the queue's order makes this unreachable
    return run.id


def _name(run: Run | str) -> str:
    return run if isinstance(run, str) else run.key


def results_table(tracker: Tracker) -> list[dict[str, Any]]:
    """The sweep's results table as the MLflow run table holds it: one row per trial run."""
    rows = []
    for run in tracker.runs():
        d = run.data
        row = result_row(d.tags.get("trial", ""), d.tags.get("stage", ""), d.tags.get("status", ""),
                         d.tags.get("rung", ""), {}, d.metrics, tracker.axes)  # fmt: skip
        rows.append({**row, **{k: d.params.get(k, "") for k in (*PARAM_KEYS, *tracker.axes)}})
    return sort_rows(rows)


def sweep_curves(
    tracker: Tracker,
) -> tuple[dict[str, list[tuple[int, float, float]]], dict[str, dict[str, Any]]]:
    """Each screening trial's learning curve from MLflow, as ``geopose-ray curves export`` writes it: per trial
    its (epoch, score, GPU-hours of that epoch, or device hours for a trial without a GPU) and its params
    (encoder, decoder, lr, accumulation and the grid's named axes). An epoch logged twice counts once (the last
    value)."""
    curves: dict[str, list[tuple[int, float, float]]] = {}
    params: dict[str, dict[str, Any]] = {}
    for run in tracker.runs():
        d = run.data
        if d.tags.get("stage") != "screen":
            continue
        rid, trial = run.info.run_id, d.tags.get("trial", run.info.run_id)
        score = {m.step: m.value for m in tracker._client.get_metric_history(rid, "score")}
        # GPU-hours; a trial that holds no GPU spends none: its device (worker) hours instead.
        spent = {m.step: m.value for m in tracker._client.get_metric_history(rid, "gpu_hours")}
        if not any(v > 0 for v in spent.values()):
            spent = {m.step: m.value for m in tracker._client.get_metric_history(rid, "device_hours")}
        # Every epoch with its hours; one without validation (val_every > 1) carries the last score (the first
        # one for the epochs before it), as the promoter sees a trial between its validations.
        points, before = [], 0.0
        scored = sorted(score)
        last = score[scored[0]] if scored else math.nan
        for epoch in sorted(set(spent) | set(score)):
            last = score.get(epoch, last)
            hours = spent.get(epoch, math.nan) - before
            before = spent.get(epoch, before)
            points.append((int(epoch), float(last), float(hours)))
        if points:
            curves[trial] = points
            keys = ("encoder", "decoder", "lr", "accumulation", *tracker.axes)
            params[trial] = {k: d.params[k] for k in keys if k in d.params}
    return curves, params

"""MLflow, in one place: one experiment per sweep, a parent run per sweep, a child run per trial.

Why not Ray's ``MLflowLoggerCallback``: it makes flat runs, one per trial, and sets tags once; a sweep here
needs nested runs (sweep → trials → fold runs), runs reattached rather than duplicated when a driver
restarts, and tags that change as the promoter pauses and promotes trials. This thin layer does that.

A slow or absent tracking server never stops training: every call goes through :meth:`Tracker._call`, which
keeps what could not be sent (metrics, tags, params) in a queue and sends it, in order, on a later call or
at :meth:`Tracker.flush`. Nothing is sent twice: a batch leaves the queue only once the server accepted it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARAM_KEYS = ("encoder", "decoder", "weights", "lr", "accumulation", "batch_size", "effective_batch", "val_fold")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"encoder": "x"}}`` → ``{"model.encoder": "x"}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def headline(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The columns a user compares trials by, from a TrainConfig dict."""
    model = cfg.get("model", {})
    return {
        "encoder": model.get("encoder"),
        "decoder": model.get("decoder"),
        "weights": model.get("weights"),
        "lr": cfg.get("lr"),
        "accumulation": cfg.get("accumulation"),
        "batch_size": cfg.get("batch_size"),
        "effective_batch": (cfg.get("batch_size") or 0) * (cfg.get("accumulation") or 0),
        "val_fold": cfg.get("val_fold"),
    }


def trial_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The params of a trial run: the headline columns, then the rest of its TrainConfig, flattened."""
    head = headline(cfg)
    rest = {k: v for k, v in flatten(cfg).items() if k not in ("model.encoder", "model.decoder", "model.weights")}
    rest = {k: v for k, v in rest.items() if k not in head}
    return {k: str(v)[:500] for k, v in {**head, **rest}.items()}


COLUMNS = ["trial", "stage", "status", "rung", *PARAM_KEYS, "epoch", "score", "score_avg", "cv_score", "cv_folds",
           "best_score", "gpu_hours", "device_hours"]  # fmt: skip


def result_row(
    trial: str, stage: str, status: str, rung: int | str, cfg: Mapping[str, Any], metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """One row of the results table (``results.csv``, ``geopose-ray results``, the parent run's artifact)."""
    nan = float("nan")
    return {
        "trial": trial,
        "stage": stage,
        "status": status,
        "rung": rung,
        **headline(cfg),
        "epoch": int(metrics.get("epoch", 0) or 0),
        "score": metrics.get("score", nan),
        "score_avg": metrics.get("score_avg", nan),
        "best_score": metrics.get("best_score", nan),
        "gpu_hours": metrics.get("gpu_hours", 0.0),
        "device_hours": metrics.get("device_hours", 0.0),
    }


def _number(r: Mapping[str, Any], name: str) -> float:
    try:
        v = float(r.get(name, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _level(r: Mapping[str, Any]) -> float:
    """A row's score for ranking: ``score_avg``, or the score where a row has none (a row from before it)."""
    v = _number(r, "score_avg")
    return _number(r, "score") if v != v else v


def fold_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows (copies), each screening trial's with its cross-validated score: ``cv_score`` is the mean level
    (:func:`_level`) of its own row and of its fold runs' rows (``<trial>/fold<k>``) that reached the same epoch,
    ``cv_folds`` how many rows that is; fold runs' own rows get blanks. A finalist's K-fold mean is the design's
    pick: K runs' own deviations average out, which no number of one run's epochs do (BENCHMARKS.md, sweep
    policies: the 5-fold pick has a fifth of the screening pick's regret)."""
    out = [dict(r) for r in rows]
    screening = {str(r["trial"]): r for r in out if r.get("stage") == "screen"}
    levels: dict[str, list[float]] = {}
    for r in out:
        parent, sep, _ = str(r["trial"]).rpartition("/fold")
        if sep and parent in screening and int(r.get("epoch") or 0) == int(screening[parent].get("epoch") or 0):
            levels.setdefault(parent, []).append(_level(r))
    for key, r in screening.items():
        values = [v for v in [_level(r), *levels.get(key, [])] if v == v]
        r["cv_score"] = float(sum(values) / len(values)) if values else math.nan
        r["cv_folds"] = len(values)
    for r in out:
        if r.get("stage") != "screen":
            r["cv_score"], r["cv_folds"] = "", ""  # not a screening trial: blank in the table, not NaN
    return out


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with their :func:`fold_means`, in the order a user picks from: screening trials first; the furthest
    trained first; among trials at the same epoch, those scored on the most folds first, the best ``cv_score``
    first (for a trial without fold runs that is its ``score_avg``, the mean of its last few epochs' scores,
    :func:`geopose_ray.metrics.window_epochs`, or its score where a row has no ``score_avg``); a trial with
    no score last at its epoch.

    Trials are compared at the epoch they reached, as the promoter compares them at a rung, not by ``best_score``:
    a maximum over every epoch so far favours the noisiest curves. The mean of the last epochs is steadier than
    the last one alone, and the mean over folds steadier still (BENCHMARKS.md, sweep policies: the simulated
    regret of each way of picking). So once the sweep is over its finalists are in the order of their K-fold
    means; while fold runs still go on, those with more folds done come first."""

    def key(r: dict[str, Any]) -> tuple[bool, int, int, float, str]:
        v = _number(r, "cv_score") if r["stage"] == "screen" else _level(r)
        folds = int(r["cv_folds"]) if r["stage"] == "screen" else 0
        return r["stage"] != "screen", -int(r.get("epoch") or 0), -folds, -v if v == v else math.inf, str(r["trial"])

    return sorted(fold_means(rows), key=key)


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sort_rows(rows))
    return buf.getvalue()


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


def format_results(rows: list[dict[str, Any]]) -> str:
    cols = [("trial", 24), ("stage", 7), ("status", 9), ("rung", 5), ("encoder", 18), ("decoder", 13), ("lr", 8),
            ("accumulation", 5), ("effective_batch", 6), ("val_fold", 5), ("epoch", 6), ("score", 8),
            ("score_avg", 10), ("cv_score", 9), ("cv_folds", 9)]  # fmt: skip
    head = "".join(
        f"{(n if n not in ('accumulation', 'effective_batch', 'val_fold') else n[:4]):<{w}}" for n, w in cols
    )
    lines = [head]
    for r in sort_rows(rows):
        cells = []
        for n, w in cols:
            v = r[n]
            text = (f"{v:.2g}" if n == "lr" else f"{v:.4f}") if isinstance(v, float) else str(v)
            cells.append(f"{text[: w - 1]:<{w}}")
        lines.append("".join(cells))
    return "\n".join(lines)

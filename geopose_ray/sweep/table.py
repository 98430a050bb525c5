"""The sweep's results table as it stands while the sweep runs (``results.csv`` and the parent run's artifacts).
No Ray: the tracker is passed in.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geopose_ray.sweep.config import axis_columns
from geopose_ray.sweep.files import RESULTS, SweepFiles
from geopose_ray.sweep.plots import curves_plot
from geopose_ray.sweep.records import Stage, TrialKey

if TYPE_CHECKING:
    from geopose_ray.tracking import Run, Tracker

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


def headline(cfg: Mapping[str, Any], axes: Sequence[str] = ()) -> dict[str, Any]:
    """The columns a user compares trials by, from a TrainConfig dict: :data:`PARAM_KEYS`, then the value of each
    of the grid's named ``axes`` (dotted training keys) under its name."""
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
        **(axis_columns(cfg, axes) if cfg else dict.fromkeys(axes, "")),
    }


def trial_params(cfg: Mapping[str, Any], axes: Sequence[str] = ()) -> dict[str, str]:
    """The params of a trial run: the headline columns (the grid's named ``axes`` among them), then the rest of
    its TrainConfig, flattened."""
    head = headline(cfg, axes)
    rest = {k: v for k, v in flatten(cfg).items() if k not in ("model.encoder", "model.decoder", "model.weights")}
    rest = {k: v for k, v in rest.items() if k not in head}
    return {k: str(v)[:500] for k, v in {**head, **rest}.items()}


COLUMNS = ["trial", "stage", "status", "rung", *PARAM_KEYS, "epoch", "score", "score_avg", "cv_score", "cv_folds",
           "best_score", "gpu_hours", "device_hours"]  # fmt: skip


def result_row(
    trial: str,
    stage: str,
    status: str,
    rung: int | str,
    cfg: Mapping[str, Any],
    metrics: Mapping[str, Any],
    axes: Sequence[str] = (),
) -> dict[str, Any]:
    """One row of the results table (``results.csv``, ``geopose-ray results``, the parent run's artifact), with
    a column for each of the grid's named ``axes``."""
    nan = float("nan")
    return {
        "trial": trial,
        "stage": stage,
        "status": status,
        "rung": rung,
        **headline(cfg, axes),
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
    screening = {str(r["trial"]): r for r in out if r.get("stage") == Stage.SCREEN}
    levels: dict[str, list[float]] = {}
    for r in out:
        key = TrialKey.parse(str(r["trial"]))
        parent = screening.get(key.trial)
        if key.is_fold_run and parent is not None and int(r.get("epoch") or 0) == int(parent.get("epoch") or 0):
            levels.setdefault(key.trial, []).append(_level(r))
    for name, r in screening.items():
        values = [v for v in [_level(r), *levels.get(name, [])] if v == v]
        r["cv_score"] = float(sum(values) / len(values)) if values else math.nan
        r["cv_folds"] = len(values)
    for r in out:
        if r.get("stage") != Stage.SCREEN:
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
        screen = r["stage"] == Stage.SCREEN
        v = _number(r, "cv_score") if screen else _level(r)
        folds = int(r["cv_folds"]) if screen else 0
        return not screen, -int(r.get("epoch") or 0), -folds, -v if v == v else math.inf, str(r["trial"])

    return sorted(fold_means(rows), key=key)


def axis_names(rows: list[dict[str, Any]]) -> list[str]:
    """The named axes' columns of ``rows`` (:func:`result_row` puts them after the fixed ones): every key that is
    not a fixed column, in the order first seen."""
    fixed = set(COLUMNS)
    return list(dict.fromkeys(k for r in rows for k in r if k not in fixed))


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: :data:`COLUMNS`, with the named axes' columns after the fixed params."""
    at = COLUMNS.index(PARAM_KEYS[-1]) + 1
    return [*COLUMNS[:at], *axis_names(rows), *COLUMNS[at:]]


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sort_rows(rows))
    return buf.getvalue()


def format_results(rows: list[dict[str, Any]]) -> str:
    cols = [("trial", 24), ("stage", 7), ("status", 9), ("rung", 5), ("encoder", 18), ("decoder", 13), ("lr", 8),
            ("accumulation", 5), ("effective_batch", 6), ("val_fold", 5), ("epoch", 6), ("score", 8),
            ("score_avg", 10), ("cv_score", 9), ("cv_folds", 9)]  # fmt: skip
    at = [n for n, _ in cols].index("val_fold") + 1
    cols[at:at] = [(a, max(8, min(24, len(a) + 2))) for a in axis_names(rows)]
    head = "".join(
        f"{(n if n not in ('accumulation', 'effective_batch', 'val_fold') else n[:4]):<{w}}" for n, w in cols
    )
    lines = [head]
    for r in sort_rows(rows):
        cells = []
        for n, w in cols:
            v = r.get(n, "")
            text = (f"{v:.2g}" if n == "lr" else f"{v:.4f}") if isinstance(v, float) else str(v)
            cells.append(f"{text[: w - 1]:<{w}}")
        lines.append("".join(cells))
    return "\n".join(lines)


class SweepTable:
    """The sweep's results table as it stands: a row per trial (screening and fold runs) and each trial's
    curve. While the sweep runs it is rewritten (``results.csv`` and the parent run's artifacts: the table and
    a plot of every screening curve with the finalists bold) at most every ``refresh_s`` seconds, as trials
    pause, finish or fail (a change that comes sooner is written once ``refresh_s`` has passed, at the next
    step of Tune's loop); the driver writes it once more at the end."""

    _behind = False  # a change not yet written, as it came within refresh_s of the last write (also if unpickled)

    axes: tuple[str, ...] = ()  # the grid's named axes: a column each (also if unpickled from before they were)

    def __init__(
        self,
        files: SweepFiles,
        rungs: list[int],
        title: str = "",
        refresh_s: float = 30.0,
        axes: Sequence[str] = (),
    ) -> None:
        self.files = files  # the table is written there as results.csv
        self.axes = tuple(axes)
        self.rungs = rungs
        self.title = title
        self.refresh_s = refresh_s
        self.rows: dict[str, dict[str, Any]] = {}  # trial key -> row
        self.curves: dict[str, list[tuple[int, float]]] = {}  # trial key -> (epoch, score)
        self.finalists: list[str] = []
        self._written = -math.inf

    @property
    def path(self) -> Path:
        """The local file (the working copy, for a remote home): MLflow's artifact is uploaded from it."""
        return self.files.local / RESULTS

    def write(self, tracker: Tracker, force: bool = False) -> None:
        """Write the table now, or, within ``refresh_s`` of the last write, at the first :meth:`catch_up` after."""
        now = time.monotonic()
        if not force and now - self._written < self.refresh_s:
            self._behind = True
            return
        self._written, self._behind = now, False
        self.files.write(RESULTS, rows_csv(list(self.rows.values())), required=force)
        screen = {k: v for k, v in self.curves.items() if self.rows.get(k, {}).get("stage") == Stage.SCREEN}
        parent = tracker.parent()
        if self.path.is_file():  # its local copy could not be written (a full disk): MLflow gets the next one
            tracker.artifact(parent, self.path)
        log_curves_plot(
            tracker, parent, screen, "screen_curves.png", rungs=self.rungs, highlight=self.finalists,
            title=f"{self.title}: screening (finalists bold)",
        )  # fmt: skip

    def catch_up(self, tracker: Tracker) -> None:
        """Write a change that came too soon after the last write, once ``refresh_s`` has passed."""
        if self._behind:
            self.write(tracker)


def log_curves_plot(
    tracker: Tracker, run: Run | str, curves: dict[str, list[tuple[int, float]]], name: str, **kw: Any
) -> None:
    """Log a learning-curve plot as an artifact of ``run``; a plotting failure never stops a sweep."""
    with tempfile.TemporaryDirectory() as d:
        try:
            plot = curves_plot(curves, Path(d) / name, **kw)
        except Exception as e:  # matplotlib on odd data: the table and the metrics matter, the picture does not
            log.warning("no %s plot (%s: %s)", name, type(e).__name__, e)
            return
        tracker.artifact(run, plot)

"""Replay a table of real learning curves through every policy, and write a finished sweep's curves as one.

The table is long-format CSV, one row per trial and epoch: ``trial,epoch,score,hours`` (``hours``: that epoch's
GPU-hours) and optional ``param.<name>`` columns (the guided order's axes, constant per trial). A trial may stop
before the last epoch (it diverged, or was stopped): the policies see it fail in the epoch after its last row,
which is paid for (at its mean hours per epoch) as a run that hits a non-finite loss pays for that epoch. The "true"
final score of a trial is its score at the table's last epoch (the best of those is the target; a trial that
stopped earlier has none); what a policy picks is ranked by the mean of the last epochs' scores, as the results
table ranks. Seeds vary only the order in which the trials arrive; no noise is added.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geopose_ray.errors import DataError
from geopose_ray.simulate.curves import Curves
from geopose_ray.simulate.measure import POLICIES, TOLERANCE, grid_gpu_hours, run_policies

COLUMNS = ("trial", "epoch", "score", "hours")


def read_curves(path: str | Path, mode: str = "max") -> Curves:
    """A curves table (module docstring) as :class:`Curves`; ``mode`` min negates the scores.

    Raises:
        DataError: naming the file, the line and what is wrong.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read the curves table ({e.strerror or e})") from e
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: the curves table lacks the column(s) {missing}; it needs {list(COLUMNS)}")
    params = [c for c in reader.fieldnames or [] if c.startswith("param.")]
    trials: dict[str, dict[int, tuple[float, float]]] = {}
    levels: dict[str, dict[str, str]] = {}
    sign = -1.0 if mode == "min" else 1.0
    for line, row in enumerate(reader, start=2):
        try:
            epoch, score, hours = int(row["epoch"]), float(row["score"]), float(row["hours"])
        except (TypeError, ValueError):
            raise DataError(
                f"{path}:{line}: epoch {row['epoch']!r}, score {row['score']!r}, hours {row['hours']!r}: the epoch "
                "must be an integer and the score and hours numbers"
            ) from None
        if epoch < 1 or not hours >= 0 or not math.isfinite(hours):
            raise DataError(f"{path}:{line}: epoch {epoch} and hours {hours}: epochs count from 1, hours are >= 0")
        name = row["trial"]
        if epoch in trials.setdefault(name, {}):
            raise DataError(f"{path}:{line}: trial {name!r} has epoch {epoch} twice")
        trials[name][epoch] = (sign * score, hours)
        levels.setdefault(name, {p.removeprefix("param."): row[p] for p in params})
    if not trials:
        raise DataError(f"{path}: the curves table has no rows")
    names = list(trials)
    top = max(max(e) for e in trials.values())
    observed = np.full((len(names), top), np.nan)
    fail = np.full(len(names), top + 1)
    minutes = np.zeros(len(names))
    for i, name in enumerate(names):
        epochs = trials[name]
        last = max(epochs)
        gaps = sorted(set(range(1, last + 1)) - set(epochs))
        if gaps:
            raise DataError(f"{path}: trial {name!r} has no row for epoch {gaps[0]} (epochs run 1, 2, ... to its last)")
        for epoch, (score, _) in epochs.items():
            observed[i, epoch - 1] = score
        if last < top:
            fail[i] = last + 1
        minutes[i] = 60.0 * sum(h for _, h in epochs.values()) / last
    if np.any(minutes <= 0):
        bad = names[int(np.argmin(minutes))]
        raise DataError(f"{path}: trial {bad!r} has 0 hours in every epoch; the hours are each epoch's cost")
    true_final = np.where(fail <= top, np.nan, observed[:, top - 1])
    if np.all(np.isnan(true_final)):
        raise DataError(f"{path}: no trial reaches the last epoch {top}, so there is no final score to aim at")
    return Curves(names, minutes, observed, fail, true_final, np.zeros(len(names)), 0.0, [levels[n] for n in names])


def default_rungs(top: int, eta: int) -> list[int]:
    """Three rungs ending at ``top``: top/η², top/η, top (rounded, at least 1, distinct)."""
    rungs = sorted({max(1, round(top / eta**2)), max(1, round(top / eta)), top})
    return rungs


def replay_table(
    curves: Curves,
    workers: int = 16,
    seeds: int = 20,
    rungs: Sequence[int] | None = None,
    eta: int = 3,
    min_results: int = 9,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Every policy on ``curves``, ``seeds`` arrival orders; one value per seed for each measure:
    ``{"grid_hours", "best", "rungs", "policies": {name: {"hours", "regret", "hours_to_within", "utilisation"}}}``,
    ``hours_to_within`` None where the pick never came within ``tolerance`` of the best final score."""
    rungs = list(rungs) if rungs else default_rungs(curves.top, eta)
    if rungs[-1] != curves.top:
        raise DataError(f"the top rung {rungs[-1]} must be the table's last epoch {curves.top}")
    out: dict[str, dict[str, list[Any]]] = {
        p: {"hours": [], "regret": [], "hours_to_within": [], "utilisation": []} for p in POLICIES
    }
    for seed in range(seeds):
        for name, o in run_policies(curves, seed, workers, rungs, eta, min_results, None, tolerance).items():
            out[name]["hours"].append(o.gpu_hours)
            out[name]["regret"].append(o.regret)
            out[name]["hours_to_within"].append(o.hours_to_near_best)
            out[name]["utilisation"].append(o.utilisation)
    return {
        "grid_hours": grid_gpu_hours(curves),
        "best": float(np.nanmax(curves.true_final)),
        "rungs": rungs,
        "policies": out,
    }


def format_replay(result: dict[str, Any]) -> str:
    """The replay as a table of medians (hours, regret, hours to within the tolerance, utilisation)."""

    def median(values: list[Any]) -> str:
        known = [v for v in values if v is not None]
        if len(known) * 2 <= len(values):
            return "never"
        return f"{float(np.median([math.inf if v is None else v for v in values])):.4g}"

    lines = [
        f"grid: {result['grid_hours']:.4g} GPU-hours; best final score {result['best']:.4f}; rungs {result['rungs']}",
        "| policy | GPU-hours | regret | GPU-hours to within | utilisation |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in result["policies"].items():
        lines.append(
            f"| {name} | {median(m['hours'])} | {median(m['regret'])} | {median(m['hours_to_within'])} | "
            f"{median(m['utilisation'])} |"
        )
    return "\n".join(lines)


def write_curves(
    path: Path, curves: dict[str, list[tuple[int, float, float]]], params: dict[str, dict[str, Any]]
) -> int:
    """Write a curves table: per trial, its (epoch, score, hours of that epoch) rows and its params. Refuses to
    overwrite a file. Returns the rows written."""
    if path.exists():
        raise DataError(f"{path}: exists; give another --out (this command does not overwrite files)")
    names = sorted({k for p in params.values() for k in p})
    rows = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*COLUMNS, *(f"param.{n}" for n in names)])
        for trial, points in curves.items():
            p = params.get(trial, {})
            for epoch, score, hours in sorted(points):
                writer.writerow([trial, epoch, repr(score), repr(hours), *(p.get(n, "") for n in names)])
                rows += 1
    tmp.replace(path)
    return rows

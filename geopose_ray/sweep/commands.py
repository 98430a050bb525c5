"""The sweep's commands, as ``geopose-ray sweep screen|promote|ensemble`` (and ``sweeps/*.py``) run them: each takes
a built config, prints its report and returns the exit code; project errors propagate to the command line. No Ray
at import time: the cluster's modules are imported only by a command that runs on it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from geopose_ray.fsutil import atomic_write_text
from geopose_ray.sweep.config import SweepConfig

if TYPE_CHECKING:
    from geopose_ray.ensemble.job import EnsembleOptions

Echo = Callable[[str], None]


def smoke(cfg: SweepConfig) -> SweepConfig:
    """A tiny version of ``cfg``: the first encoder and decoder, the first two learning rates and accumulation
    steps, the first value of each named axis, rungs of 1, 2 and 3 epochs with η = 2, 1 CPU and no GPU per trial,
    named ``<name>-smoke``."""
    g = cfg.grid
    first = g.encoders[:1]
    axes = {a: g.axis_values(a, first[0])[:1] for a in g.axes}
    grid = dataclasses.replace(
        g, encoders=first, decoders=g.decoders[:1], lrs=g.lrs[:2], accumulation=g.accumulation[:2], axes=axes
    )
    return dataclasses.replace(
        cfg, name=f"{cfg.name}-smoke", grid=grid, rungs=[1, 2, 3], eta=2, cpus_per_trial=1, gpus_per_trial=0
    )


def screen(
    cfg: SweepConfig, *, smoke_test: bool = False, validate_only: bool = False, resume: bool = False, echo: Echo = print
) -> int:
    """Validate ``cfg`` (its :func:`smoke` version with ``smoke_test``) and print its notes and size; then, unless
    ``validate_only``, screen it on Ray and train the finalists on every fold (``resume``: continue a sweep whose
    driver stopped). Returns 0; raises :class:`~geopose_ray.errors.GeoposeError` on a bad config or sweep."""
    if smoke_test:
        cfg = smoke(cfg)
    for note in cfg.validate():
        echo(f"note: {note}")
    echo(f"{cfg.name}: {cfg.n_trials} trials ({cfg.search}), rungs {cfg.rungs}, eta {cfg.eta}")
    plan = cfg.budget_plan()
    echo(plan.statement())
    if not plan.screens_grid:
        never = plan.grid - plan.screened
        echo(
            f"warning: budget_gpu_hours {cfg.budget_gpu_hours:g} cannot screen the grid once: {never} of "
            f"{plan.grid} grid points will never start (screening all takes about {plan.grid_screening_hours:,.0f}; "
            "raise the budget or shrink the grid)"
        )
    if validate_only:
        return 0
    from geopose_ray.cluster.driver import run_sweep

    echo(run_sweep(cfg, resume=resume).report())
    return 0


def promote(
    cfg: SweepConfig, *, budget_gpu_hours: float | None = None, add_rung: int | None = None, echo: Echo = print
) -> int:
    """Reopen the finished sweep ``cfg`` on Ray with a larger GPU-hour budget, a new top rung (epochs), or both,
    and print its report. Returns 0; raises :class:`~geopose_ray.errors.GeoposeError` when it cannot."""
    from geopose_ray.cluster.driver import reopen_sweep

    echo(reopen_sweep(cfg, budget_gpu_hours=budget_gpu_hours, add_rung=add_rung).report())
    return 0


def ensemble(cfg: SweepConfig, options: EnsembleOptions, echo: Echo = print) -> int:
    """Build the ensemble of the sweep ``cfg``'s finalists on Ray (:func:`~geopose_ray.ensemble.job.run_ensemble`),
    write ``summary.json`` beside its submission and print the out-of-fold progression, the members' weights, the
    outputs and the test score when the truth is given. Returns 0; raises
    :class:`~geopose_ray.errors.GeoposeError` on bad input or a worker's error."""
    from geopose_ray.ensemble.job import result_summary, run_ensemble

    result = run_ensemble(cfg, options)
    atomic_write_text(result.submission.parent / "summary.json", json.dumps(result_summary(result), indent=1))
    for step, score in result.fit.progression:
        echo(f"  {score:8.4f}  {step}")
    echo(f"out-of-fold score {result.fit.score:.4f}; members {result.fit.weights}")
    echo(f"submission: {result.submission} ({result.tiles} tiles), archive: {result.archive}")
    if result.score is not None:
        echo(f"test score: {result.score:.4f}")
    return 0

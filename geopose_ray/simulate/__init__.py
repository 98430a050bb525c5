"""The sweep simulator: the promoter against the full grid, Ray's stop-based ASHA and random search, on
learning curves fitted to the seed's table, replayed on W simulated T4 workers with a discrete-event clock.

``curves`` draws the populations, ``engine`` replays policies on workers, ``measure`` scores them.
"""

from __future__ import annotations

from geopose_ray.simulate.curves import Curves, draw_curves
from geopose_ray.simulate.engine import (
    AshaPolicy,
    GridPolicy,
    RandomPolicy,
    Run,
    SweepPolicy,
    replay,
)
from geopose_ray.simulate.measure import Outcome, evaluate, fold_pipeline, format_table, simulate, simulate_seed

__all__ = [
    "AshaPolicy",
    "Curves",
    "GridPolicy",
    "Outcome",
    "RandomPolicy",
    "Run",
    "SweepPolicy",
    "draw_curves",
    "evaluate",
    "fold_pipeline",
    "format_table",
    "replay",
    "simulate",
    "simulate_seed",
]

"""What a sweep config's grid costs on the challenge's data, and what budgets buy on it, before any trial runs.

Each grid point costed from its pixels and encoder (``geopose_ray/sweep/cost.py``) on the challenge's 5,923
training tiles in 5 folds (4,738 trained on, 1,185 validated on), at the resolution the config's cache would
have (``--tile``: 2048 for a full-resolution cache, 1024 for ``--downsample 2``); then what each budget buys by
successive halving. No cache and no Ray: the same functions the sweep's start-up statement calls.

    .venv/bin/python bench/sweep_costs.py --config sweeps/configs/screen-winners.yaml --tile 2048
    .venv/bin/python bench/sweep_costs.py --config sweeps/configs/screen-t4.yaml --tile 1024
"""

from __future__ import annotations

import argparse

from geopose_ray.engine.config import TrainConfig
from geopose_ray.sweep.config import SweepConfig
from geopose_ray.sweep.cost import DataSize, budget_plan, epoch_hours

TILES, FOLDS = 5923, 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--tile", type=int, default=2048, help="tile side at the cache's resolution (default 2048)")
    ap.add_argument("--budgets", default="1000,1900,5000,12000", help="GPU-hours, comma-separated")
    args = ap.parse_args()
    cfg = SweepConfig.from_yaml(args.config)
    val = round(TILES / FOLDS)
    data = DataSize(TILES - val, val, args.tile)
    costs = [epoch_hours(TrainConfig.from_dict(c), data) for c in cfg.trial_configs()]
    by_encoder: dict[str, list[float]] = {}
    for c, h in zip(cfg.trial_configs(), costs, strict=True):
        by_encoder.setdefault(c["model"]["encoder"], []).append(h)
    print(f"{cfg.name}: {len(costs)} grid points, rungs {cfg.rungs}, eta {cfg.eta}, tiles {args.tile} px")
    for enc, hours in by_encoder.items():
        print(f"  {enc:28s} T4-hours per epoch {min(hours):6.2f} to {max(hours):6.2f}")
    print(budget_plan(costs, cfg.rungs, cfg.eta, None).statement())
    for b in (float(x) for x in args.budgets.split(",")):
        plan = budget_plan(costs, cfg.rungs, cfg.eta, b)
        print(f"  budget {b:8,.0f}: {plan.screened:4d} first-rung trials, about {plan.finalists:3d} finalists, "
              f"{plan.screening_hours:8,.0f} expected")  # fmt: skip


if __name__ == "__main__":
    main()

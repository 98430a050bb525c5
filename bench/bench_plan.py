"""The share of seeds whose final pick (after the fold runs) is within 0.002 of the best, against the budget, for
the shipped settings (screen-t4.yaml's rungs, η and guided search, every finalist's fold runs, the budget as
screening's cap), for settings the planner chose at 1,900 GPU-hours (given as arguments) and, with ``--replan``,
for what the planner chooses at each budget (``plan`` on ``--plan-seeds`` seeds, then measured like the rest), on
the seed's 240 configurations and 16 workers. Simulated (``geopose_ray/simulate/plan.py``'s ``measure``: the
same replay the planner runs), every budget on the same seeds.

    .venv/bin/python bench/bench_plan.py --rungs 7,22,67,200 --eta 3 --top-k 1 --search guided [--seeds 20] [--replan]
"""

from __future__ import annotations

import argparse
import json

from geopose_ray.simulate.plan import Candidate, measure, plan

BUDGETS = (1000, 1900, 3000, 5000, 10000, 20000)
REPLAN_UP_TO = 3000  # planning at larger budgets replays nearly whole grids 500 times: an hour and more on one core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rungs", required=True)
    ap.add_argument("--eta", type=int, required=True)
    ap.add_argument("--top-k", type=int, required=True)
    ap.add_argument("--search", choices=["grid", "guided"], required=True)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--trials", type=int, default=240)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--replan", action="store_true", help="also plan at every budget")
    ap.add_argument("--plan-seeds", type=int, default=6)
    args = ap.parse_args()
    shipped = Candidate((20, 40, 100, 200), 3, None, "guided")
    planned = Candidate(tuple(int(r) for r in args.rungs.split(",")), args.eta, args.top_k, args.search)
    rows = []
    for budget in BUDGETS:
        settings = [("shipped", shipped), ("planned", planned)]
        if args.replan and budget <= REPLAN_UP_TO:
            chosen = plan(args.trials, args.workers, budget, args.plan_seeds)[0].candidate
            settings.append(("replanned", chosen))
            print(json.dumps({"budget": budget, "replanned": str(chosen)}), flush=True)
        for name, c in settings:
            m = measure(c, args.trials, args.workers, budget, range(args.seeds))
            row = {"budget": budget, "settings": name, "within": None if m is None else m.within,
                   "regret": None if m is None else m.regret, "gpu_hours": None if m is None else m.gpu_hours,
                   "wall_h": None if m is None else m.wall_h}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name in ("shipped", "planned", "replanned"):
        reached = [r["budget"] for r in rows if r["settings"] == name and (r["within"] or 0) >= 0.9]
        print(f"{name}: 90 % of seeds within 0.002 from {min(reached) if reached else 'none of the budgets tried'}")


if __name__ == "__main__":
    main()

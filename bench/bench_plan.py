"""The share of seeds whose final pick (after the fold runs) is within 0.002 of the best, against the budget, for
the shipped settings (screen-t4.yaml's rungs, η and guided search, every finalist's fold runs, the budget as
screening's cap) and for settings the planner chose (given as arguments; ``geopose-ray plan`` prints them), on
the seed's 240 configurations and 16 workers. Simulated (``geopose_ray/simulate/plan.py``'s ``measure``: the same
replay the planner runs), every budget on the same seeds.

    .venv/bin/python bench/bench_plan.py --rungs 20,60,200 --eta 3 --top-k 1 --search grid [--seeds 20]
"""

from __future__ import annotations

import argparse
import json

from geopose_ray.simulate.plan import Candidate, measure

BUDGETS = (1000, 1900, 3000, 5000, 10000, 20000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rungs", required=True)
    ap.add_argument("--eta", type=int, required=True)
    ap.add_argument("--top-k", type=int, required=True)
    ap.add_argument("--search", choices=["grid", "guided"], required=True)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--trials", type=int, default=240)
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args()
    shipped = Candidate((20, 40, 100, 200), 3, None, "guided")
    planned = Candidate(tuple(int(r) for r in args.rungs.split(",")), args.eta, args.top_k, args.search)
    rows = []
    for budget in BUDGETS:
        for name, c in (("shipped", shipped), ("planned", planned)):
            m = measure(c, args.trials, args.workers, budget, range(args.seeds))
            row = {"budget": budget, "settings": name, "within": None if m is None else m.within,
                   "regret": None if m is None else m.regret, "gpu_hours": None if m is None else m.gpu_hours,
                   "wall_h": None if m is None else m.wall_h}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name in ("shipped", "planned"):
        reached = [r["budget"] for r in rows if r["settings"] == name and (r["within"] or 0) >= 0.9]
        print(f"{name}: 90 % of seeds within 0.002 from {min(reached) if reached else 'none of the budgets tried'}")


if __name__ == "__main__":
    main()

"""Reopen a finished sweep: raise its GPU-hour budget, add a rung above the top one, or both.

ray job submit --working-dir . -- python sweeps/promote.py --config launch/sweeps/screen-t4-cloud.yaml --budget 400
python sweeps/promote.py --config sweeps/configs/demo.yaml --add-rung 16

Paused trials that qualify under the larger budget are promoted; with a new rung, the best 1/η of the old top
rung go on to it. Every trial continues from its last checkpoint (no epoch is trained again) in its own MLflow
run; the new finalists get their fold runs, and existing fold runs continue to the new top rung.
"""

from __future__ import annotations

import argparse
import sys

from geopose_ray.errors import GeoposeError
from geopose_ray.sweep.config import add_config_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, "the sweep's YAML, as it was run (sweeps/configs/)")
    ap.add_argument("--budget", type=float, default=None, help="the new GPU-hour budget (above what is spent)")
    ap.add_argument("--add-rung", type=int, default=None, help="a new top rung, in epochs")
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
        from geopose_ray.cluster.driver import reopen_sweep

        result = reopen_sweep(cfg, budget_gpu_hours=args.budget, add_rung=args.add_rung)
    except GeoposeError as e:
        print(f"promote: error: {e}", file=sys.stderr)
        return 2
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

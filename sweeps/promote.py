"""Reopen a finished sweep: raise its GPU-hour budget, add a rung above the top one, or both.

ray job submit --working-dir . -- python sweeps/promote.py --config sweeps/configs/screen-t4.yaml --budget 400
python sweeps/promote.py --config sweeps/configs/demo.yaml --add-rung 16

Paused trials that qualify under the larger budget are promoted; with a new rung, the best 1/η of the old top
rung go on to it. Every trial continues from its last checkpoint (no epoch is trained again) in its own MLflow
run; the new finalists get their fold runs, and existing fold runs continue to the new top rung.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from geopose_ray.errors import GeoposeError
from geopose_ray.sweep.config import SweepConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the sweep's YAML, as it was run (sweeps/configs/)")
    ap.add_argument("--budget", type=float, default=None, help="the new GPU-hour budget (above what is spent)")
    ap.add_argument("--add-rung", type=int, default=None, help="a new top rung, in epochs")
    ap.add_argument("--cache", default=None, help="override the config's cache, as for screen.py")
    ap.add_argument("--tracking-uri", default=None, help="override the config's MLflow tracking URI")
    ap.add_argument("--storage", default=None, help="override the config's storage_path, as for screen.py")
    args = ap.parse_args(argv)
    try:
        cfg = SweepConfig.from_yaml(args.config)
        if args.cache:
            cfg = dataclasses.replace(cfg, cache=args.cache)
        if args.storage:
            cfg = dataclasses.replace(cfg, storage_path=args.storage)
        if args.tracking_uri:
            cfg = dataclasses.replace(cfg, tracking_uri=args.tracking_uri)
        from geopose_ray.sweep.driver import reopen_sweep
        from geopose_ray.tracking import format_results

        result = reopen_sweep(cfg, budget_gpu_hours=args.budget, add_rung=args.add_rung)
    except GeoposeError as e:
        print(f"promote: error: {e}", file=sys.stderr)
        return 2
    print(format_results(result.rows))
    print(f"finalists: {result.finalists}\nresults table: {result.table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

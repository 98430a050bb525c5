"""Screen a grid with the promoter on Ray Tune, then train the finalists on every fold.

ray job submit --working-dir . -- python sweeps/screen.py --config sweeps/configs/demo.yaml
python sweeps/screen.py --config sweeps/configs/screen-t4.yaml --smoke-test   # a tiny version, locally
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from geopose_ray.errors import GeoposeError
from geopose_ray.sweep.config import GridConfig, SweepConfig


def smoke(cfg: SweepConfig) -> SweepConfig:
    """The first two values of each grid axis, rungs of 1, 2 and 3 epochs, 1 CPU and no GPU per trial."""
    g = cfg.grid
    grid = GridConfig(g.encoders[:1], g.decoders[:1], g.lrs[:2], g.accumulation[:2], g.weights, g.batch_size)
    return dataclasses.replace(
        cfg, name=f"{cfg.name}-smoke", grid=grid, rungs=[1, 2, 3], eta=2, cpus_per_trial=1, gpus_per_trial=0
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a sweep YAML (sweeps/configs/)")
    ap.add_argument("--smoke-test", action="store_true", help="a tiny version of the sweep")
    ap.add_argument("--validate-only", action="store_true", help="check the config and exit")
    ap.add_argument("--cache", default=None, help="override the config's cache (an absolute path on a cluster)")
    ap.add_argument("--tracking-uri", default=None, help="override the config's MLflow tracking URI")
    ap.add_argument("--storage", default=None, help="override the config's storage_path")
    ap.add_argument("--resume", action="store_true", help="continue a sweep whose driver stopped")
    args = ap.parse_args(argv)
    try:
        cfg = SweepConfig.from_yaml(args.config)
        if args.cache:
            cfg = dataclasses.replace(cfg, cache=args.cache)
        if args.storage:
            cfg = dataclasses.replace(cfg, storage_path=args.storage)
        if args.tracking_uri:
            cfg = dataclasses.replace(cfg, tracking_uri=args.tracking_uri)
        if args.smoke_test:
            cfg = smoke(cfg)
        for note in cfg.validate():
            print(f"note: {note}")
        print(f"{cfg.name}: {cfg.n_trials} trials ({cfg.search}), rungs {cfg.rungs}, eta {cfg.eta}")
        if args.validate_only:
            return 0
        from geopose_ray.sweep.driver import run_sweep
        from geopose_ray.tracking import format_results

        result = run_sweep(cfg, resume=args.resume)
    except GeoposeError as e:
        print(f"screen: error: {e}", file=sys.stderr)
        return 2
    print(format_results(result.rows))
    print(f"finalists: {result.finalists}\nresults table: {result.table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

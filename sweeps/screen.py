"""Screen a grid with the promoter on Ray Tune, then train the finalists on every fold.

ray job submit --working-dir . -- python sweeps/screen.py --config sweeps/configs/demo.yaml \
    --cache "$PWD/runs/demo/cache" --storage "$PWD/runs/demo/sweeps"   # a job needs absolute paths
python sweeps/screen.py --config sweeps/configs/screen-t4.yaml --smoke-test   # a tiny version, locally
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from geopose_ray.errors import GeoposeError
from geopose_ray.sweep.config import GridConfig, SweepConfig, add_config_args, config_from_args


def smoke(cfg: SweepConfig) -> SweepConfig:
    """The first two values of each grid axis, rungs of 1, 2 and 3 epochs, 1 CPU and no GPU per trial."""
    g = cfg.grid
    grid = GridConfig(g.encoders[:1], g.decoders[:1], g.lrs[:2], g.accumulation[:2], g.weights, g.batch_size)
    return dataclasses.replace(
        cfg, name=f"{cfg.name}-smoke", grid=grid, rungs=[1, 2, 3], eta=2, cpus_per_trial=1, gpus_per_trial=0
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--smoke-test", action="store_true", help="a tiny version of the sweep")
    ap.add_argument("--validate-only", action="store_true", help="check the config and exit")
    ap.add_argument("--resume", action="store_true", help="continue a sweep whose driver stopped")
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.smoke_test:
            cfg = smoke(cfg)
        for note in cfg.validate():
            print(f"note: {note}")
        print(f"{cfg.name}: {cfg.n_trials} trials ({cfg.search}), rungs {cfg.rungs}, eta {cfg.eta}")
        if args.validate_only:
            return 0
        from geopose_ray.cluster.driver import run_sweep

        result = run_sweep(cfg, resume=args.resume)
    except GeoposeError as e:
        print(f"screen: error: {e}", file=sys.stderr)
        return 2
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

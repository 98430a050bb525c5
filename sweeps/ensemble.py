"""Turn a finished sweep's finalists into a challenge submission: out-of-fold fitted weights, city factors and
scale model, then inference over the test tiles spread over the cluster.

ray job submit --working-dir . -- python sweeps/ensemble.py --config launch/sweeps/screen-t4-cloud.yaml \
    --test /data/geopose/test --out /home/ray/submission   # a job needs absolute paths
python sweeps/ensemble.py --config sweeps/configs/demo.yaml --test runs/demo/data/test --truth runs/demo/data/test_truth
"""

from __future__ import annotations

import argparse
import json
import sys

from geopose_ray.errors import GeoposeError
from geopose_ray.sweep.config import add_config_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, "the sweep's YAML, as it was run")
    ap.add_argument("--test", required=True, help="the test tiles (challenge layout)")
    ap.add_argument("--truth", default=None, help="the test truth, if known: the submission is scored")
    ap.add_argument(
        "--out",
        default=None,
        help="output directory (default <storage>/<name>/ensemble; runs/<name>/ensemble for a bucket)",
    )
    ap.add_argument("--members", default=None, help="comma-separated screening trial ids (default every finalist)")
    ap.add_argument("--tta", default="none", choices=["none", "flip", "d4"], help="test-time augmentation")
    ap.add_argument("--amp", default="auto", choices=["auto", "off"], help="bf16/fp16 inference where supported")
    ap.add_argument("--workers", type=int, default=None, help="inference tasks (default: the cluster's CPUs/GPUs)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per inference task (fractions share)")
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
        from geopose_ray.ensemble.job import EnsembleOptions, result_summary, run_ensemble

        names = tuple(n.strip() for n in args.members.split(",") if n.strip()) if args.members else None
        options = EnsembleOptions(
            args.test, args.out, args.truth, names, args.tta, args.amp, args.workers, args.gpus_per_worker
        )
        result = run_ensemble(cfg, options)
    except GeoposeError as e:
        print(f"ensemble: error: {e}", file=sys.stderr)
        return 2
    summary = result_summary(result)
    (result.submission.parent / "summary.json").write_text(json.dumps(summary, indent=1))
    for step, score in result.fit.progression:
        print(f"  {score:8.4f}  {step}")
    print(f"out-of-fold score {result.fit.score:.4f}; members {result.fit.weights}")
    print(f"submission: {result.submission} ({result.tiles} tiles), archive: {result.archive}")
    if result.score is not None:
        print(f"test score: {result.score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

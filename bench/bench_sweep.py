"""Sweep overhead on the demo sweep: how much worker time goes to training, the time to the first epoch,
and MLflow's cost per epoch.

Runs the embedded default's sweep (8 trials, rungs 2/4/8, local Ray on this machine's cores) on a freshly
synthesized cache, then reads every trial's Tune results: ``train_s`` (the engine's training-step time of the
epoch) against the trial's wall time (``time_total_s``, which includes process start, imports, model build,
validation, checkpointing, reporting and resuming). MLflow's cost is timed separately: one epoch's metrics and
tags for a trial run on the SQLite store, 200 times, median.

    .venv/bin/python bench/bench_sweep.py                                        # the demo's own cache
    .venv/bin/python bench/bench_sweep.py --tiles 48 --size 256 --downsample 1  # longer epochs, same sweep
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from geopose_ray.cluster.driver import run_sweep
from geopose_ray.data.cache import prepare_cache
from geopose_ray.data.synth import synthesize
from geopose_ray.demo import demo_sweep
from geopose_ray.tracking import Tracker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=48)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--downsample", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "data", args.tiles, args.size, seed=0, workers=2)
        prepare_cache(root / "data" / "train", root / "cache", args.downsample, workers=2)
        cfg = demo_sweep("bench", root / "cache", root / "sweeps")
        ray.init(include_dashboard=False, log_to_driver=False)
        start = time.time()
        result = run_sweep(cfg)
        wall = time.time() - start
        ray.shutdown()
        train_s = val_s = total_s = 0.0
        first = float("inf")
        epochs = 0
        for stage in ("bench-screen", "bench-folds"):
            for trial in (root / "sweeps" / stage).iterdir():
                if not (trial / "result.json").exists():
                    continue
                lines = [json.loads(x) for x in (trial / "result.json").read_text().splitlines()]
                train_s += sum(x["train_s"] for x in lines)
                val_s += sum(x.get("val_s", 0.0) for x in lines)
                total_s += max(x["time_total_s"] for x in lines)
                epochs += len(lines)
                if stage == "bench-screen":
                    first = min(first, min(x["timestamp"] for x in lines))
        tracker = Tracker(f"sqlite:///{root / 'm.db'}", "bench", "bench")
        run = tracker.trial("t", {"model": {"encoder": "x", "decoder": "y"}, "lr": 1.0}, "screen")
        assert run is not None
        metrics = {k: 0.5 for k in ("score", "agl_r2", "flow_r2", "train/total", "val/total", "images_per_s")}
        costs = []
        for epoch in range(200):
            t = time.perf_counter()
            tracker.metrics(run, metrics, epoch)
            tracker.tags(run, {"status": "running", "rung": 1})
            costs.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "cache": f"{args.tiles} tiles, {args.size // args.downsample} px",
                "trials": len(result.rows),
                "epochs_reported": epochs,
                "sweep_wall_s": round(wall, 1),
                "worker_s": round(total_s, 1),
                "training_step_s": round(train_s, 1),
                "validation_s": round(val_s, 1),
                "training_share": round(train_s / total_s, 3),
                "training_and_validation_share": round((train_s + val_s) / total_s, 3),
                "submit_to_first_epoch_s": round(first - start, 1),
                "mlflow_per_epoch_ms_median": round(1000 * statistics.median(costs), 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Ensemble test inference, tiles per second: the job's way against the naive way, same machine, one run.

- naive: each fold model of each member loaded in turn, and every test tile read and decoded again for each
  of them (one process, as a by-hand script does it); then the predictions combined and written.
- job: ``predict_shard`` as ``geopose-ray sweep ensemble`` runs it on Ray: every worker loads all fold models once,
  decodes each tile once and runs the members channels-last in bf16 where the CPU supports it (``--amp auto``).
  Shown in fp32 with 1 worker (decoding once and channels-last memory), then with mixed precision on 1 worker
  and on 2 (the machine's cores).

Members are tiny (tu-test_resnet U-Nets, 5 folds each); the models' weights do not change the work, so one
trained checkpoint serves every fold model. ``--repeats`` runs each, median reported.

    .venv/bin/python bench/bench_ensemble.py [--tiles 16] [--size 1024] [--members 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from geopose_ray.cluster.ensemble import shards
from geopose_ray.data.cache import downsample_rgb, prepare_cache
from geopose_ray.data.layout import CITIES, city_of, scan_dir
from geopose_ray.data.rasters import read_rgb
from geopose_ray.data.submission import write_prediction
from geopose_ray.data.synth import synthesize
from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.engine.predict import load_model, predict_batch
from geopose_ray.ensemble.combine import Prediction, combine
from geopose_ray.ensemble.fit import EnsembleFit
from geopose_ray.ensemble.infer import predict_shard, test_inputs
from geopose_ray.ensemble.job import _Finish
from geopose_ray.ensemble.members import FoldModel, Member


def naive(members: list[Member], test: Path, stems: list[str], out: Path, k: int) -> None:
    inputs = test_inputs(test, stems)
    preds: dict[str, list[list[Prediction]]] = {s: [[] for _ in members] for s in stems}
    for i, m in enumerate(members):
        for f in m.folds:
            model = load_model(f.checkpoint, torch.device("cpu"))[0]
            for s in stems:
                path, gsd, city = inputs[s]
                image = torch.from_numpy(downsample_rgb(read_rgb(path), k).transpose(2, 0, 1).copy())[None]
                agl, scale, angle = predict_batch(model, image, torch.tensor([gsd]), torch.tensor([city]))
                preds[s][i].append(Prediction(agl[0], float(scale[0]), float(angle[0])))
    for s in stems:
        final = combine([combine(p) for p in preds[s]])
        write_prediction(out, s, final.agl, final.scale, final.angle, full_shape=read_rgb(inputs[s][0]).shape[:2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--downsample", type=int, default=2)
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "data", 8, args.size, seed=0, test_tiles=args.tiles, workers=2)
        prepare_cache(root / "data" / "train", root / "cache", args.downsample, folds=2, workers=2)
        cfg = {"cache": str(root / "cache"), "model": {"encoder": "tu-test_resnet"}, "epochs": 1, "batch_size": 2}
        Trainer(TrainConfig.from_dict(cfg), root / "ckpt").fit()
        ckpt = root / "ckpt" / "best.pt"
        members = [
            Member(f"m{i}", "bench", tuple(FoldModel(f"m{i}/fold{k}", ckpt, k) for k in range(args.folds)))
            for i in range(args.members)
        ]
        test = root / "data" / "test"
        stems = sorted(s for s, f in scan_dir(test).items() if f.rgb)
        assert all(city_of(s) in CITIES for s in stems)
        w = 1.0 / len(members)
        fit = EnsembleFit({m.name: w for m in members}, "greedy", {}, None, 0.0, [("bench", 0.0)])
        finish = _Finish(fit, [m.name for m in members])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        task = ray.remote(predict_shard).options(num_cpus=1)
        warm = str(root / "warm")
        ray.get(task.remote(members, str(test), stems[:1], warm, args.downsample, finish, "none", "cpu", 1))
        times: dict[str, list[float]] = {
            "naive, 1 process": [], "job, 1 worker, fp32": [], "job, 1 worker": [], "job, 2 workers": []
        }  # fmt: skip
        for _ in range(args.repeats):
            for name in times:
                out = root / "sub"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                start = time.perf_counter()
                if name.startswith("naive"):
                    naive(members, test, stems, out, args.downsample)
                else:
                    n = 1 if "1 worker" in name else 2
                    amp = "off" if "fp32" in name else "auto"
                    ray.get([
                        task.remote(members, str(test), shard, str(out), args.downsample, finish, "none", "cpu", 1, amp)
                        for shard in shards(stems, n)
                    ])  # fmt: skip
                times[name].append(time.perf_counter() - start)
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: args.tiles / v for k, v in med.items()}
    base = rate["naive, 1 process"]
    print(json.dumps({
        "tiles": args.tiles, "size": args.size, "downsample": args.downsample, "members": args.members,
        "folds": args.folds, "fold_models": args.members * args.folds, "repeats": args.repeats,
        "tiles_per_s": {k: round(v, 3) for k, v in rate.items()},
        "speedup_vs_naive": {k: round(v / base, 2) for k, v in rate.items()},
        "samples_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

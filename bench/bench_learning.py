"""Learning, shown: the baseline (U-Net, ResNet-18 encoder, no pretrained weights) on the synthetic dataset.

Synthesizes ``--tiles`` tiles, prepares the cache (downsample 2), trains on folds 1-3 and validates on fold 0
every epoch; prints the validation score, AGL R², flow R² and direction error per epoch, and the floor: the
same validation fold scored by the training-means predictor (each city's mean height, mean scale and
circular-mean angle over the training folds), through the same scoring code.

    .venv/bin/python bench/bench_learning.py [--tiles 192] [--size 128] [--epochs 60]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from geopose_ray.baselines import means_floor
from geopose_ray.data.cache import TrainingCache, prepare_cache
from geopose_ray.data.synth import synthesize
from geopose_ray.engine import TrainConfig, Trainer


def run(
    tiles: int, size: int, epochs: int, lr: float, encoder: str, workdir: Path, log: bool = True
) -> dict[str, object]:
    synthesize(workdir / "data", tiles, size, seed=0, workers=2)
    prepare_cache(workdir / "data" / "train", workdir / "cache", 2, folds=4, seed=0, workers=2)
    floor = means_floor(TrainingCache(workdir / "cache"), val_fold=0).score
    cfg = TrainConfig(cache=str(workdir / "cache"), epochs=epochs, batch_size=8, lr=lr)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "model": {"encoder": encoder}})
    curve: list[dict[str, float]] = []
    start = time.perf_counter()

    def on_epoch(m: dict[str, float], _: Path) -> None:
        row = {k: round(m[k], 4) for k in ("epoch", "score", "agl_r2", "flow_r2", "val/xy", "train/total")}
        row["s"] = round(time.perf_counter() - start, 1)
        curve.append(row)
        if log:
            print(json.dumps(row), flush=True)

    Trainer(cfg, workdir / "run", on_epoch=on_epoch).fit()
    return {"floor": floor, "curve": curve, "best_score": max(r["score"] for r in curve)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=192)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--encoder", default="resnet18")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.tiles, args.size, args.epochs, args.lr, args.encoder, Path(tmp))
    print(json.dumps({"floor": result["floor"], "best_score": result["best_score"]}))


if __name__ == "__main__":
    main()

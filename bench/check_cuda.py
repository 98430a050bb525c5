"""The CUDA code paths end to end, on a lent GPU: what the CPU-only CI cannot run.

1. Train a U-Net/ResNet-18 (random init) for 2 epochs on CUDA with fp16 autocast and a grad scaler, twice: straight
   through, and one epoch at a time (the second run resumes from the first's last.pt: weights, optimizer, scaler,
   and the CPU and CUDA random states).
2. Predict the test tiles from the resumed run's checkpoint on CUDA and on the CPU, with 8-fold TTA, and score
   both submissions against the truth.

Checks: the resumed run trained exactly the epochs it should; its losses are finite and close to the straight
run's (cuDNN is not bitwise deterministic, so close, not equal); the CUDA and CPU predictions of one checkpoint
agree tile by tile and score the same.

    python bench/check_cuda.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from geopose_ray.data.cache import prepare_cache
from geopose_ray.data.rasters import read_agl
from geopose_ray.data.synth import synthesize
from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.engine.predict import predict_dir
from geopose_ray.models import ModelConfig
from geopose_ray.scoring import score_dirs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (bf16, CPU against CPU)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out: dict[str, object] = {"device": name, "torch": torch.__version__}
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        workers = max(2, min(os.cpu_count() or 2, 16))
        synthesize(root / "data", 32, 256, seed=0, test_tiles=8, workers=workers)
        prepare_cache(root / "data" / "train", root / "cache", 2, folds=4, workers=workers)

        def cfg(epochs: int) -> TrainConfig:
            return TrainConfig(
                cache=str(root / "cache"), model=ModelConfig(encoder="resnet18"), epochs=epochs, batch_size=4,
                lr=1e-3, amp="fp16" if dev == "cuda" else "bf16", device=dev, num_workers=2,
            )  # fmt: skip

        straight = Trainer(cfg(2), root / "straight").fit()
        first = Trainer(cfg(1), root / "resumed").fit()
        again = Trainer(cfg(2), root / "resumed")
        resumed_from = again.epoch
        second = again.fit()
        out["epochs"] = {"straight": len(straight), "resumed_from": resumed_from, "resumed": len(second)}
        if resumed_from != 1 or len(first) != 1 or len(second) != 2:
            failures.append(f"resume: from epoch {resumed_from}, histories {len(first)} and {len(second)}")
        losses = {k: [h["train/total"] for h in v] for k, v in (("straight", straight), ("resumed", second))}
        out["train_total"] = losses
        if not all(math.isfinite(x) for v in losses.values() for x in v):
            failures.append(f"non-finite training loss: {losses}")
        gap = abs(losses["resumed"][-1] - losses["straight"][-1]) / abs(losses["straight"][-1])
        out["resumed_vs_straight_rel_gap"] = gap
        if gap > 0.05:
            failures.append(f"resumed run's last loss is {gap:.1%} from the straight run's")
        out["peak_mem_mb"] = second[-1]["peak_mem_mb"]

        scores = {}
        for name, device in (("cuda", dev), ("cpu", "cpu")):
            predict_dir(root / "resumed" / "last.pt", root / "data" / "test", root / name, tta="d4", device=device)
            scores[name] = score_dirs(root / "data" / "test_truth", root / name).score
        out["score"] = scores
        diffs = []
        for agl in sorted((root / "cpu").glob("*_AGL.tif")):
            a, b = read_agl(agl), read_agl(root / "cuda" / agl.name)
            diffs.append(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        out["agl_max_abs_diff_m"] = max(diffs) if diffs else None
        if not diffs:
            failures.append("no AGL predictions written")
        elif max(diffs) > 0.05:
            failures.append(f"CUDA and CPU AGL predictions differ by up to {max(diffs):.3f} m")
        if abs(scores["cuda"] - scores["cpu"]) > 1e-3:
            failures.append(f"CUDA and CPU submissions score {scores['cuda']:.5f} and {scores['cpu']:.5f}")
    out["failures"] = failures
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

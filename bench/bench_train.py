"""Training throughput: the engine vs a plain fp32 loop like the published baseline's.

Same model (U-Net + geopose heads), same cached data, same batch. The reference loop does, per batch:
forward, loss, backward, optimizer step, in fp32, nothing else. The engine runs its full epoch (mixed
precision as configured, accumulation bookkeeping, non-finite checks, metrics) with validation switched off.
Each variant trains ``--epochs`` epochs after one warm-up epoch; images/s per epoch, median reported.

CPU (this machine):   .venv/bin/python bench/bench_train.py
GPU (a lent device):  python bench/bench_train.py --device cuda --encoder resnet34 --size 1024 --tiles 64 \
                          --batch 4 --workers 4 --variants ref,fp32,fp32-cl,fp16,fp16-cl,bf16,bf16-cl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from geopose_ray.data.cache import prepare_cache
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.data.synth import synthesize
from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.losses import geopose_loss
from geopose_ray.models import GeoposeModel, ModelConfig

VARIANTS = {  # name -> (amp, channels_last, torch.compile)
    "fp32": ("off", False, False),
    "fp32-cl": ("off", True, False),
    "fp16": ("fp16", False, False),
    "fp16-cl": ("fp16", True, False),
    "fp16-cl-compile": ("fp16", True, True),
    "bf16": ("bf16", False, False),
    "bf16-cl": ("bf16", True, False),
}


def reference_loop(
    cache: Path, model_cfg: ModelConfig, batch: int, epochs: int, device: str, workers: int
) -> list[float]:
    torch.manual_seed(0)
    model = GeoposeModel(model_cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = GeoposeDataset(str(cache))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device == "cuda"
    )
    rates = []
    for _ in range(epochs + 1):
        start, seen = time.perf_counter(), 0
        for b in loader:
            b = {k: v.to(device) for k, v in b.items()}
            out = model(b["image"])
            loss = geopose_loss(out, b)["total"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen += b["image"].shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    return rates[1:]  # the first epoch is warm-up


def engine(
    cache: Path, out: Path, model_cfg: ModelConfig, batch: int, epochs: int, device: str, workers: int, variant: str
) -> tuple[list[float], float]:
    amp, cl, compiled = VARIANTS[variant]
    cfg = TrainConfig(
        cache=str(cache), val_fold=None, model=model_cfg, augment=None, epochs=epochs + 1, batch_size=batch,
        lr=1e-4, amp=amp, channels_last=cl, compile=compiled, device=device, num_workers=workers,
    )  # fmt: skip
    rates: list[float] = []
    peaks: list[float] = []
    Trainer(cfg, out, on_epoch=lambda m, _: (rates.append(m["images_per_s"]), peaks.append(m["peak_mem_mb"]))).fit()
    return rates[1:], max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--size", type=int, default=128, help="training resolution (tiles are synthesized at this size)")
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variants", default="ref,fp32,fp32-cl,bf16,bf16-cl")
    ap.add_argument("--workers", type=int, default=0, help="data-loader worker processes, for both loops")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    model_cfg = ModelConfig(decoder="Unet", encoder=args.encoder)
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "encoder": args.encoder, "size": args.size, "batch": args.batch, "epochs_timed": args.epochs,
        "workers": args.workers, "torch": torch.__version__,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prep = max(2, min(os.cpu_count() or 2, 16))
        synthesize(root / "data", args.tiles, args.size, seed=0, workers=prep)
        prepare_cache(root / "data" / "train", root / "cache", 1, workers=prep)
        for v in args.variants.split(","):
            if v == "ref":
                rates, peak = (
                    reference_loop(root / "cache", model_cfg, args.batch, args.epochs, args.device, args.workers),
                    None,
                )
            else:
                rates, peak = engine(
                    root / "cache", root / v, model_cfg, args.batch, args.epochs, args.device, args.workers, v
                )
            results[v] = {"images_per_s": statistics.median(rates), "peak_mem_mb": peak}
            print(v, results[v], flush=True)
    ref = results.get("ref")
    if isinstance(ref, dict):
        for v in args.variants.split(","):
            if v != "ref":
                results[v]["speedup_vs_ref"] = results[v]["images_per_s"] / ref["images_per_s"]  # type: ignore[index]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

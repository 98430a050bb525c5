"""The training loop: mixed precision, true gradient accumulation, validation with the challenge score,
atomic checkpoints and exact resume.

Reproducibility: the model is initialised from ``seed``; each epoch's shuffling comes from a generator
seeded by (seed, epoch) and each sample's augmentation from (seed, epoch, index); the global torch RNG
(dropout) is saved in every checkpoint. On the CPU a run resumed from a checkpoint therefore ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from geopose_ray.data.cache import TrainingCache
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.data.layout import CITIES
from geopose_ray.engine.checkpoint import load_checkpoint, save_checkpoint
from geopose_ray.engine.config import TrainConfig
from geopose_ray.errors import ConfigError, GeoposeError
from geopose_ray.geometry import direction_to_angle
from geopose_ray.losses import geopose_loss
from geopose_ray.metrics import TileStats, score_report, tile_stats, window_epochs
from geopose_ray.models.geopose import GeoposeModel

LAST = "last.pt"
BEST = "best.pt"
CHECK_EVERY = 32  # micro-batches between checks of the training losses for non-finite values


class TrainingError(GeoposeError):
    """Training cannot go on (a non-finite loss, for one)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but no CUDA device is available; use device: auto or cpu")
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. ``auto`` is fp16 on CUDA and off on the CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode in ("auto", "fp16"):
        return torch.float16
    return torch.bfloat16


def batch_sizes(n: int, batch: int) -> list[int]:
    """Sizes of the micro-batches of an epoch of ``n`` samples (the last may be smaller)."""
    return [batch] * (n // batch) + ([n % batch] if n % batch else [])


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (torch generators take signed 64-bit seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]) >> 1


@dataclass
class EpochResult:
    """What one epoch measured."""

    metrics: dict[str, float]  # flat: train/..., val/..., score, images_per_s, peak_mem_mb, ...
    stats: list[TileStats]  # validation tiles, for the per-city breakdown


class Trainer:
    """Train one configuration, resuming from ``out_dir/last.pt`` when it exists.

    Args:
        cfg: the run's configuration (validated here).
        out_dir: where checkpoints go (``last.pt`` after every epoch, to resume from; ``best.pt``, the weights of
            the best validation score, to predict with).
        model: a model to train instead of building ``cfg.model`` (tests use tiny ones).
        on_epoch: called after every epoch with the flat metrics and the path of the checkpoint just written.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        model: nn.Module | None = None,
        on_epoch: Callable[[dict[str, float], Path], None] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.on_epoch = on_epoch
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        torch.manual_seed(cfg.seed)
        self.model = (model if model is not None else GeoposeModel(cfg.model)).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward: Callable[..., dict[str, torch.Tensor]] = torch.compile(self.model) if cfg.compile else self.model
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        # On CUDA the fused kernel updates every parameter at once and takes the grad scaler's inf check on the
        # device: the unfused step reads it back to the host every step. Its state loads into either kind.
        self.optimizer = opt_cls(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self.device.type == "cuda"
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.cache = TrainingCache(cfg.cache)
        folds = sorted({r.fold for r in self.cache.rows})
        if cfg.val_fold is not None and cfg.val_fold not in folds:
            raise ConfigError(f"The value of `val_fold` is {cfg.val_fold}, but the cache's folds are {folds} (or null)")
        train_folds = [f for f in folds if f != cfg.val_fold]
        self.train_set = GeoposeDataset(self.cache, train_folds, cfg.augment, cfg.seed, cfg.bad_tiles)
        self.val_set = (
            GeoposeDataset(self.cache, [cfg.val_fold], bad_tiles=cfg.bad_tiles) if cfg.val_fold is not None else None
        )
        if len(self.train_set) == 0:
            raise TrainingError(f"no training tiles: every tile of {cfg.cache} is in validation fold {cfg.val_fold}")
        self.steps_per_epoch = math.ceil(len(batch_sizes(len(self.train_set), cfg.batch_size)) / cfg.accumulation)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.best_score = -math.inf
        self.history: list[dict[str, float]] = []
        if (self.out_dir / LAST).exists():
            # Loaded to the CPU: load_state_dict copies weights and optimizer state to where the model is, and the
            # random states must be CPU byte tensors (mapped to CUDA, torch.set_rng_state refuses them).
            self._restore(load_checkpoint(self.out_dir / LAST, "cpu"))

    # -- checkpoints -------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": self.cfg.to_dict(),
            "downsample": self.cache.downsample,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "history": self.history,
            "rng": rng,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_score = float(state["best_score"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self, epochs: int | None = None) -> list[dict[str, float]]:
        """Train until ``epochs`` (default ``cfg.epochs``) epochs are complete; returns the history."""
        target = self.cfg.epochs if epochs is None else epochs
        while self.epoch < target:
            result = self.run_epoch()
            self.epoch += 1
            metrics = {"epoch": float(self.epoch), **result.metrics}
            self.history.append(metrics)
            # Without a validation fold every epoch is the best so far: best.pt follows last.pt.
            improved = self.val_set is None or metrics.get("score", -math.inf) > self.best_score
            if improved and "score" in metrics:
                self.best_score = metrics["score"]
            if "score" in metrics:
                scores = [h["score"] for h in self.history if "score" in h]
                metrics["score_avg"] = float(np.mean(scores[-window_epochs(self.epoch, self.cfg.score_window) :]))
            metrics["best_score"] = self.best_score
            state = self.state()
            save_checkpoint(self.out_dir / LAST, state)
            if improved:  # for prediction only: the weights, not the optimizer (a third of the size)
                keep = ("config", "downsample", "model", "epoch", "step", "best_score")
                save_checkpoint(self.out_dir / BEST, {k: state[k] for k in keep})
            if self.on_epoch is not None:
                self.on_epoch(metrics, self.out_dir / LAST)
        return self.history

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.cfg.channels_last:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    def _lr(self) -> float:
        if self.cfg.schedule == "constant":
            return self.cfg.lr
        total = max(1, self.cfg.epochs * self.steps_per_epoch)
        return self.cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(self.step, total) / total))

    def _loader(self, dataset: GeoposeDataset, shuffle: bool) -> DataLoader[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed_for(self.cfg.seed, self.epoch))
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def run_epoch(self) -> EpochResult:
        """Train one epoch (``self.epoch`` is the 0-based index of it) and validate."""
        cfg = self.cfg
        self.train_set.set_epoch(self.epoch)
        sizes = batch_sizes(len(self.train_set), cfg.batch_size)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # The loss sums stay on the device and the losses are checked for non-finite values every CHECK_EVERY
        # micro-batches: reading a value back makes the host wait for the GPU, which then idles while the next
        # step's kernels are queued. A run that diverges is still stopped, CHECK_EVERY steps late at most and
        # with the first bad step named; the weights it trained in memory are dropped, the checkpoint is intact.
        sums: dict[str, torch.Tensor] = {}
        unchecked: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # (micro-batch, its lr, its losses)
        seen = bad = 0
        start = time.perf_counter()
        for i, batch in enumerate(self._loader(self.train_set, shuffle=True)):
            group = i // cfg.accumulation
            group_total = sum(sizes[group * cfg.accumulation : (group + 1) * cfg.accumulation])
            bad += int(batch["skipped"].sum())
            b = self._to_device(batch)
            n = int(b["image"].shape[0])
            with self._autocast():
                pred = self.forward(b["image"], b["gsd"], b["city"])
                losses = geopose_loss(pred, b, cfg.loss)
            # Each micro-batch's loss is its samples' mean; weighting it by its share of the optimizer step's
            # samples makes the accumulated gradient that of the whole effective batch, tail included.
            self.scaler.scale(losses["total"] * (n / group_total)).backward()
            detached = {k: v.detach().float() for k, v in losses.items()}
            for k, v in detached.items():
                sums[k] = sums[k] + v * n if k in sums else v * n
            unchecked.append((i, self._lr(), detached))
            seen += n
            if (i + 1) % cfg.accumulation == 0 or i + 1 == len(sizes):
                self._optimizer_step()
            if len(unchecked) >= CHECK_EVERY:
                self._check_finite(unchecked)
                unchecked = []
        self._check_finite(unchecked)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_s = time.perf_counter() - start
        means = torch.stack(list(sums.values())).cpu().tolist() if sums else []
        metrics = {f"train/{k}": v / seen for k, v in zip(sums, means, strict=True)}
        metrics["images_per_s"] = seen / train_s
        metrics["bad_tiles"] = float(bad)  # unreadable training tiles passed over this epoch
        metrics["train_s"] = train_s
        metrics["lr"] = self._lr()
        stats: list[TileStats] = []
        if self.val_set is not None and len(self.val_set):
            val_start = time.perf_counter()
            val_metrics, stats = self.validate()
            metrics.update(val_metrics)
            metrics["val_s"] = time.perf_counter() - val_start
        metrics["peak_mem_mb"] = (
            torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        return EpochResult(metrics, stats)

    def _check_finite(self, steps: list[tuple[int, float, dict[str, torch.Tensor]]]) -> None:
        """Raise :class:`TrainingError` naming the first of ``steps`` (micro-batch, its lr, its losses) whose
        total loss is not finite. One read-back from the device for all of them."""
        if not steps:
            return
        finite = torch.stack([losses["total"] for _, _, losses in steps]).isfinite().cpu()
        if bool(finite.all()):
            return
        i, lr, losses = steps[int((~finite).nonzero()[0])]
        parts = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        raise TrainingError(
            f"non-finite loss at epoch {self.epoch + 1}, step {i + 1} ({parts}); the last checkpoint, if any, is "
            f"intact: lower the learning rate (now {lr:.3g}), enable grad_clip, or check the data with "
            "geopose-ray validate"
        )

    def _optimizer_step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], list[TileStats]]:
        """The challenge score on the validation fold (per city, pooled, exactly as ``geopose-ray score``
        computes it, at the cache's resolution) and the validation loss parts."""
        assert self.val_set is not None
        self.model.eval()
        sums: dict[str, float] = {}
        stats: list[TileStats] = []
        bad = 0
        for batch in self._loader(self.val_set, shuffle=False):
            keep = batch["skipped"] == 0
            if not bool(keep.all()):  # a replaced sample is a tile scored on its own already: count it once
                bad += int((~keep).sum())
                batch = {k: v[keep] for k, v in batch.items()}
                if not len(batch["image"]):
                    continue
            b = self._to_device(batch)
            with self._autocast():
                pred = self.forward(b["image"], b["gsd"], b["city"])
                losses = geopose_loss(pred, b, self.cfg.loss)
            n = int(b["image"].shape[0])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            stats.extend(self._tile_stats(batch, pred))
        report = score_report(stats)
        metrics = {f"val/{k}": v / max(1, len(self.val_set) - bad) for k, v in sums.items()}
        metrics["val_bad_tiles"] = float(bad)
        metrics["score"] = report.score
        for city, c in report.cities.items():
            metrics[f"score/{city}"] = c.score
        metrics["agl_r2"] = float(np.mean([c.agl_r2 for c in report.cities.values()]))
        metrics["flow_r2"] = float(np.mean([c.flow_r2 for c in report.cities.values()]))
        return metrics, stats

    def _tile_stats(self, batch: dict[str, torch.Tensor], pred: dict[str, torch.Tensor]) -> Iterator[TileStats]:
        assert self.val_set is not None
        agl_pred = pred["agl"].float().cpu().numpy()[:, 0]
        xy = pred["xy"].float().cpu().numpy()
        scale_pred = pred["scale"].float().cpu().numpy()
        for j in range(agl_pred.shape[0]):
            truth = np.where(batch["valid"][j, 0].numpy(), batch["agl"][j, 0].numpy(), np.nan)
            yield tile_stats(
                self.val_set.rows[int(batch["index"][j])].stem,
                CITIES[int(batch["city"][j])],
                truth,
                float(batch["scale"][j]),
                float(batch["angle"][j]),
                agl_pred[j],
                float(scale_pred[j]),
                float(direction_to_angle(xy[j, 0], xy[j, 1])),
            )

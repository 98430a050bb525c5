"""The training loop: mixed precision, true gradient accumulation, validation with the challenge score,
atomic checkpoints and exact resume.

Reproducibility: the model is initialised from ``seed``; each epoch's shuffling comes from a generator
seeded by (seed, epoch) and each sample's augmentation from (seed, epoch, index); the global torch RNG
(dropout) is saved in every checkpoint. On the CPU a run resumed from a checkpoint therefore ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import json
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
from geopose_ray.engine.config import Stage, TrainConfig
from geopose_ray.errors import ConfigError, GeoposeError
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.geometry import direction_to_angle
from geopose_ray.losses import geopose_loss
from geopose_ray.metrics import EPS, TileStats, score_report, tile_stats, window_epochs
from geopose_ray.models.geopose import GeoposeModel
from geopose_ray.storage import join

LAST = "last.pt"
BEST = "best.pt"
TOP_PREFIX = "top-"  # top-{epoch:04d}.pt: the weights of the top_k best validation epochs (with top_k > 1)
TOP_LIST = "top.json"  # [{"file", "epoch", "score"}] of the kept top-k checkpoints, best first
CHECK_EVERY = 32  # micro-batches between checks of the training losses for non-finite values


class TrainingError(GeoposeError):
    """Training cannot go on (a non-finite loss, for one)."""


class NonFiniteLoss(TrainingError):
    """A training loss turned NaN or infinite; ``fp16`` says whether the run trained in fp16 autocast."""

    def __init__(self, message: str, fp16: bool = False) -> None:
        super().__init__(message)
        self.fp16 = fp16

    def __reduce__(self) -> tuple[type, tuple[str, bool]]:
        # Ray copies and pickles a trial's exception; the default rebuilds it from ``args`` alone.
        return (type(self), (str(self), self.fp16))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but no CUDA device is available; use device: auto or cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA compute capability 8.0 (Ampere) and newer.

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (a T4, capability 7.5), where
    it runs several times slower than fp16.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. ``auto`` is off on the CPU and, on CUDA, bf16 where the
    GPU computes it natively, else fp16."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if mode == "fp16":
        return torch.float16
    return torch.bfloat16


def fallback_amp(device: torch.device) -> str:
    """The precision to retry a run in whose fp16 loss turned non-finite: bf16 where native, else full."""
    return "bf16" if native_bf16(device) else "off"


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
            the best validation score, to predict with; with ``top_k`` > 1 also ``top-{epoch}.pt`` for each of
            the k best epochs).
        model: a model to train instead of building ``cfg.model`` (tests use tiny ones).
        on_epoch: called after every epoch with the flat metrics and the path of the checkpoint just written.
        faults: injected faults, for tests: ``{"nonfinite_at_epoch": E}`` makes the first training loss of
            epoch E (0-based) NaN when the run trains in fp16.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        model: nn.Module | None = None,
        on_epoch: Callable[[dict[str, float], Path], None] | None = None,
        faults: dict[str, Any] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.plan = cfg.plan()
        self.faults = dict(faults or {})
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.on_epoch = on_epoch
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = (model if model is not None else GeoposeModel(cfg.model)).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward: Callable[..., dict[str, torch.Tensor]] = torch.compile(self.model) if cfg.compile else self.model
        self.cache = TrainingCache(cfg.cache)
        folds = sorted({r.fold for r in self.cache.rows})
        if cfg.val_fold is not None and cfg.val_fold not in folds:
            raise ConfigError(f"The value of `val_fold` is {cfg.val_fold}, but the cache's folds are {folds} (or null)")
        self.train_folds = [f for f in folds if f != cfg.val_fold]
        self.val_set = (
            GeoposeDataset(self.cache, [cfg.val_fold], bad_tiles=cfg.bad_tiles) if cfg.val_fold is not None else None
        )
        self.city_means = self._city_means() if any(_uses_r2(st.cfg) for st in self.plan) else None
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken in the current stage
        self.best_score = -math.inf
        self.top: list[tuple[float, int]] = []  # (score, epoch) of the kept top-k checkpoints, best first
        self.history: list[dict[str, float]] = []
        self._enter(self.plan[0])
        if (self.out_dir / LAST).exists():
            # Loaded to the CPU: load_state_dict copies weights and optimizer state to where the model is, and the
            # random states must be CPU byte tensors (mapped to CUDA, torch.set_rng_state refuses them).
            self._restore(load_checkpoint(self.out_dir / LAST, "cpu"))
        elif cfg.init_from:
            self._warm_start(cfg.init_from)

    # -- stages ------------------------------------------------------------------------------------------

    def _enter(self, stage: Stage) -> None:
        """Start ``stage``: its data, a fresh optimizer and grad scaler, its schedule from step 0."""
        c = stage.cfg
        self.stage = stage
        self.stage_cfg = c
        self.amp_dtype = resolve_amp(c.amp, self.device)
        self.optimizer = _optimizer(self.model, c, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.train_set = GeoposeDataset(
            self.cache, self.train_folds, c.augment, self.cfg.seed, self.cfg.bad_tiles, c.crop, c.crops_per_tile,
            c.crop_scale,
        )  # fmt: skip
        if len(self.train_set) == 0:
            raise TrainingError(
                f"no training tiles: every tile of {self.cfg.cache} is in validation fold {self.cfg.val_fold}"
            )
        self.steps_per_epoch = math.ceil(len(batch_sizes(len(self.train_set), c.batch_size)) / c.accumulation)
        self.step = 0
        # The schedule's horizon is fixed when the stage starts and kept in the checkpoint (see schedule_epochs).
        self.horizon = c.schedule_epochs or (stage.end - stage.start)

    def _stage_of(self, epoch: int) -> Stage:
        for stage in self.plan:
            if stage.start <= epoch < stage.end:
                return stage
        return self.plan[-1]  # past the planned epochs (fit(epochs) beyond cfg.epochs): the last stage goes on

    def _warm_start(self, location: str) -> None:
        """Weights only from a checkpoint or a run's directory; the optimizer, step and schedule stay fresh."""
        state = load_checkpoint(_weights_file(location), "cpu")
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as e:
            theirs = state.get("config", {}).get("model", {})
            raise ConfigError(
                f"init_from {location}: its weights do not fit this model (it is {theirs.get('decoder')} / "
                f"{theirs.get('encoder')}, this run {self.cfg.model.decoder} / {self.cfg.model.encoder}); warm-start "
                "from a run of the same architecture"
            ) from e

    def _city_means(self) -> torch.Tensor:
        """Per city, the damped means (μ_h, μ_v) of the training folds' heights and flow components, as the score
        computes them: μ_h = Σh / (n + 1e-4), μ_v = Σ(v_x + v_y) / (2n + 1e-4). Rows for absent cities are 0."""
        n = np.zeros(len(CITIES))
        sum_h = np.zeros(len(CITIES))
        sum_v = np.zeros(len(CITIES))
        for row in self.cache.rows:
            if row.fold not in self.train_folds:
                continue
            meta = self.cache.meta(row.stem)
            if "valid_px" in meta and "agl_sum" in meta:
                count, total = float(meta["valid_px"]), float(meta["agl_sum"])  # type: ignore[arg-type]
            else:  # a cache written before the sums were recorded: one pass over the heights
                agl = self.cache.load(row.stem).agl
                finite = np.isfinite(agl)
                count, total = float(finite.sum()), float(agl[finite].sum(dtype=np.float64))
            scale = float(meta["scale"])  # type: ignore[arg-type]
            angle = float(meta["angle"])  # type: ignore[arg-type]
            c = CITIES.index(row.city)
            n[c] += count
            sum_h[c] += total
            sum_v[c] += scale * (math.sin(angle) + math.cos(angle)) * total
        means = np.stack([sum_h / (n + EPS), sum_v / (2 * n + EPS)], axis=1)
        return torch.tensor(means, dtype=torch.float32, device=self.device)

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
            "stage": self.stage.index,
            "horizon": self.horizon,
            "best_score": self.best_score,
            "top": [[score, epoch] for score, epoch in self.top],
            "history": self.history,
            "rng": rng,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        stage = int(state.get("stage", 0))
        if stage >= len(self.plan):
            raise ConfigError(
                f"{self.out_dir / LAST}: the checkpoint is in stage {stage + 1} but this config has "
                f"{len(self.plan)} stage(s); resume with the config it was trained with"
            )
        self._enter(self.plan[stage])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.horizon = int(state.get("horizon", self.horizon))
        self.best_score = float(state["best_score"])
        self.top = [(float(score), int(epoch)) for score, epoch in state.get("top", [])]
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        kept = {self.out_dir / _top_name(epoch) for _, epoch in self.top}
        for stale in self.out_dir.glob(f"{TOP_PREFIX}*.pt"):  # written or evicted around a crash
            if stale not in kept:
                stale.unlink(missing_ok=True)

    def top_checkpoints(self) -> list[Path]:
        """The kept top-k checkpoints, best first (``best.pt`` alone with top_k 1)."""
        if self.cfg.top_k == 1:
            return [self.out_dir / BEST] if (self.out_dir / BEST).exists() else []
        return [self.out_dir / _top_name(epoch) for _, epoch in self.top]

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self, epochs: int | None = None) -> list[dict[str, float]]:
        """Train until ``epochs`` (default ``cfg.epochs``) epochs are complete; returns the history."""
        target = self.cfg.epochs if epochs is None else epochs
        while self.epoch < target:
            stage = self._stage_of(self.epoch)
            if stage.index != self.stage.index:
                self._enter(stage)
            done = self.epoch + 1
            validate = done % self.stage_cfg.val_every == 0 or done in (target, self.cfg.epochs, stage.end)
            result = self.run_epoch(validate=validate)
            self.epoch += 1
            metrics = {"epoch": float(self.epoch), "stage": float(stage.index + 1), **result.metrics}
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
            weights = ("config", "downsample", "model", "epoch", "step", "best_score")  # for prediction only
            evicted = self._update_top(metrics.get("score"), {k: state[k] for k in weights})
            state["top"] = [[score, epoch] for score, epoch in self.top]
            save_checkpoint(self.out_dir / LAST, state)
            if self.cfg.top_k > 1:  # for readers that should not load last.pt: the ensemble on remote storage
                kept = [{"file": _top_name(e), "epoch": e, "score": score} for score, e in self.top]
                atomic_write_text(self.out_dir / TOP_LIST, json.dumps(kept))
            for path in evicted:  # only once last.pt no longer lists them
                path.unlink(missing_ok=True)
            if improved:  # the weights, not the optimizer (a third of the size)
                save_checkpoint(self.out_dir / BEST, {k: state[k] for k in weights})
            if self.on_epoch is not None:
                self.on_epoch(metrics, self.out_dir / LAST)
        return self.history

    def _update_top(self, score: float | None, weights: dict[str, Any]) -> list[Path]:
        """Keep this epoch among the top_k checkpoints if its score ranks there; returns the files to delete."""
        if self.cfg.top_k == 1 or score is None or not math.isfinite(score):
            return []
        ranked = sorted([*self.top, (score, self.epoch)], key=lambda t: (-t[0], t[1]))
        kept, dropped = ranked[: self.cfg.top_k], ranked[self.cfg.top_k :]
        if (score, self.epoch) in kept:
            save_checkpoint(self.out_dir / _top_name(self.epoch), weights)
        self.top = kept
        return [self.out_dir / _top_name(epoch) for _, epoch in dropped if epoch != self.epoch]

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
        """The learning rate of the stage's optimizer step ``self.step``: linear warmup, then the schedule."""
        c = self.stage_cfg
        per_epoch = self.steps_per_epoch
        warm = c.warmup_epochs * per_epoch
        if self.step < warm:
            return c.lr * min(1.0, (self.step + 1) / warm)
        if c.schedule == "cosine":
            total = max(1.0, self.horizon * per_epoch - warm)
            t = min(self.step - warm, total) / total
            return c.lr_min + (c.lr - c.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))
        if c.schedule == "step":
            passed = sum(self.step >= e * per_epoch for e in c.step_at)
            return max(c.lr_min, c.lr * c.step_gamma**passed)
        return c.lr

    def _loader(
        self, dataset: GeoposeDataset, shuffle: bool, batch_size: int | None = None
    ) -> DataLoader[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed_for(self.cfg.seed, self.epoch))
        return DataLoader(
            dataset,
            batch_size=batch_size or self.stage_cfg.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def run_epoch(self, validate: bool = True) -> EpochResult:
        """Train one epoch (``self.epoch`` is the 0-based index of it) and validate (if ``validate``)."""
        cfg = self.stage_cfg
        poison = self.faults.get("nonfinite_at_epoch") == self.epoch and self.amp_dtype == torch.float16
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
                losses = geopose_loss(pred, b, cfg.loss, city_means=self.city_means)
            if poison and i == 0:  # an injected fault: this step's loss overflows, as an fp16 run's may
                losses["total"] = losses["total"] * torch.tensor(math.nan, device=self.device)
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
        if validate and self.val_set is not None and len(self.val_set):
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
        raise NonFiniteLoss(
            f"non-finite loss at epoch {self.epoch + 1}, step {i + 1} ({parts}); the last checkpoint, if any, is "
            f"intact: lower the learning rate (now {lr:.3g}), enable grad_clip, or check the data with "
            "geopose-ray validate",
            fp16=self.amp_dtype == torch.float16,
        )

    def _optimizer_step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        if self.stage_cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.stage_cfg.grad_clip)
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
        for batch in self._loader(self.val_set, shuffle=False, batch_size=self.stage_cfg.val_batch_size):
            keep = batch["skipped"] == 0
            if not bool(keep.all()):  # a replaced sample is a tile scored on its own already: count it once
                bad += int((~keep).sum())
                batch = {k: v[keep] for k, v in batch.items()}
                if not len(batch["image"]):
                    continue
            b = self._to_device(batch)
            with self._autocast():
                pred = self.forward(b["image"], b["gsd"], b["city"])
                losses = geopose_loss(pred, b, self.stage_cfg.loss, city_means=self.city_means)
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


def _uses_r2(cfg: TrainConfig) -> bool:
    weights = cfg.loss.weights()
    return weights.get("r2_agl", 0.0) > 0 or weights.get("r2_mag", 0.0) > 0


def _optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """Adam or AdamW. Unless ``decay_norm_and_bias``, biases and normalisation parameters (every parameter with
    fewer than two dimensions) are not decayed: decaying them only pulls the affine parts of the norms to 0."""
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay > 0 and not cfg.decay_norm_and_bias:
        groups: list[dict[str, Any]] = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    # On CUDA the fused kernel updates every parameter at once and takes the grad scaler's inf check on the
    # device: the unfused step reads it back to the host every step. Its state loads into either kind.
    return opt_cls(groups, lr=cfg.lr, fused=fused)


def _top_name(epoch: int) -> str:
    return f"{TOP_PREFIX}{epoch:04d}.pt"


def _weights_file(location: str) -> str:
    """The checkpoint of ``init_from``: a ``.pt`` file as given, else a run directory's best.pt (its last.pt
    when it has no best.pt), locally or on remote storage."""
    if location.endswith(".pt"):
        return location
    if "://" not in location:
        d = Path(location)
        if not d.is_dir():
            raise ConfigError(f"init_from {location}: no such checkpoint or run directory")
        for name in (BEST, LAST):
            if (d / name).is_file():
                return str(d / name)
        raise ConfigError(f"init_from {location}: the directory holds neither {BEST} nor {LAST}")
    return join(location, BEST)

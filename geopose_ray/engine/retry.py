"""A run that survives the two failures a long GPU run meets: out of memory, and an fp16 loss that overflows.

Each is retried once from the run's last checkpoint (the epoch in progress is lost, nothing before it):

* out of memory: half the micro-batch and twice the accumulation, the same effective batch for an even batch
  size (tagged ``oom_retry``, with the new ``batch_size`` and ``accumulation``);
* a non-finite loss in fp16 autocast: in bf16 where the device computes it natively, else in full precision
  (tagged ``nan_retry``, with ``amp_bits`` 16 or 32). A non-finite loss in bf16 or fp32 is the run's own
  divergence and is not retried.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from geopose_ray.engine.config import TrainConfig
from geopose_ray.engine.trainer import NonFiniteLoss, Trainer, fallback_amp, resolve_device

log = logging.getLogger(__name__)


def fit_with_retries(
    cfg: TrainConfig,
    out_dir: str | Path,
    on_epoch: Callable[[dict[str, float], Path], None] | None = None,
    faults: dict[str, Any] | None = None,
    trainers: list[Trainer] | None = None,
) -> Trainer:
    """Train ``cfg`` into ``out_dir`` (resuming from its last.pt), retrying once per failure kind as above.

    Every epoch's metrics carry the retry tags from the retry on. ``trainers`` collects each attempt's Trainer
    (the last is the one running); ``faults`` are passed to them (tests), plus ``oom_above_batch``: a micro-batch
    above it raises out of memory, as a too-large batch does.
    """
    faults = dict(faults or {})
    attempts: list[Trainer] = [] if trainers is None else trainers
    tags: dict[str, float] = {}
    retried: set[str] = set()

    def report(metrics: dict[str, float], last: Path) -> None:
        if on_epoch is not None:
            on_epoch({**metrics, **tags}, last)

    while True:
        try:
            trainer = Trainer(cfg, out_dir, on_epoch=report, faults=faults)
            attempts.append(trainer)
            limit = faults.get("oom_above_batch")
            if limit is not None and cfg.batch_size > int(limit):
                raise torch.OutOfMemoryError(f"simulated: batch {cfg.batch_size} > {limit} does not fit")
            trainer.fit()
            return trainer
        except torch.OutOfMemoryError:
            if "oom" in retried or cfg.batch_size < 2:
                raise
            retried.add("oom")
            cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2, accumulation=cfg.accumulation * 2)
            log.warning("out of memory; retrying at batch %d x %d accumulation", cfg.batch_size, cfg.accumulation)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tags.update(oom_retry=1.0, batch_size=cfg.batch_size, accumulation=cfg.accumulation)
        except NonFiniteLoss as e:
            if "nan" in retried or not e.fp16:
                raise
            retried.add("nan")
            amp = fallback_amp(resolve_device(cfg.device))
            log.warning("non-finite loss in fp16 (%s); retrying from the last checkpoint with amp %s", e, amp)
            stages = tuple({k: v for k, v in st.items() if k != "amp"} for st in cfg.stages)
            cfg = dataclasses.replace(cfg, amp=amp, stages=stages)
            faults.pop("nonfinite_at_epoch", None)  # an injected fault happens once, as an overflow would
            tags.update(nan_retry=1.0, amp_bits=16.0 if amp == "bf16" else 32.0)

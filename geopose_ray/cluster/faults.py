"""Fault injection for the tests: a killed worker, a slow trial, an out-of-memory batch."""

from __future__ import annotations

import math
import os
import signal
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from geopose_ray.cluster.scheduler import _pid
from geopose_ray.engine import TrainConfig
from geopose_ray.sweep.records import is_fold_run


class KillAfterResult(Callback):
    """Fault injection (tests): ``faults: {kill_after_result: E}`` SIGKILLs a screening trial's worker process as
    soon as the driver has processed its epoch-E result, before Tune registers that epoch's checkpoint: the
    moment at which losing a pre-empted node costs the most. Once per trial; a single-machine cluster only (the
    result's pid is a local process)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.done: set[str] = set()

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        if int(result.get("epoch", 0)) != self.epoch or result.get("replayed") or is_fold_run(_pid(trial)):
            return
        if trial.trial_id not in self.done:
            self.done.add(trial.trial_id)
            os.kill(int(result["pid"]), signal.SIGKILL)


def _injected_delay(raw: dict[str, Any], cfg: TrainConfig) -> float:
    """Fault injection (tests): ``faults: {slow: {lr, accumulation, seconds}}`` makes that screening trial's every
    epoch take ``seconds`` longer (its fold runs too with ``folds: true``)."""
    slow = raw.get("_faults", {}).get("slow")
    if not slow or (raw.get("_finalist") and not slow.get("folds")):
        return 0.0
    matches = math.isclose(cfg.lr, float(slow["lr"])) and cfg.accumulation == int(slow["accumulation"])
    return float(slow["seconds"]) if matches else 0.0

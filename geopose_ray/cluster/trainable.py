"""The Ray Tune function trainable: one TrainConfig trained with a checkpoint every epoch, an out-of-memory
retry, and a scratch directory per trial.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

from geopose_ray.cluster.faults import _injected_delay
from geopose_ray.cluster.replay import REPORTED, _replay, _unregistered
from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.engine.trainer import LAST
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.storage import copy_file, join
from geopose_ray.sweep.records import resolve_config, trial_key

log = logging.getLogger(__name__)


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one TrainConfig, reporting every epoch with a checkpoint and
    resuming from Tune's checkpoint when the trial is resumed or restarted."""
    raw = resolve_config(config)
    torch.set_num_threads(max(1, int(raw.get("_threads", 1))))
    gpus = float(raw.get("_gpus", 0.0))  # GPUs the trial holds: what a bill (and the budget) counts
    _, config = trial_key("", raw)
    cfg = TrainConfig.from_dict(config)
    work = _work_dir()
    checkpoint = tune.get_checkpoint()
    unregistered: list[tuple[Path, int]] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copy(Path(d) / LAST, work / LAST)
        unregistered = _unregistered(checkpoint)
    elif raw.get("_resume_from"):  # continued in a reopened sweep: from its last checkpoint there
        copy_file(join(raw["_resume_from"], LAST), work / LAST)

    trainers: list[Trainer] = []  # the one running (a second after an out-of-memory retry)

    delay = _injected_delay(raw, cfg)

    def report(metrics: dict[str, float], last: Path) -> None:
        time.sleep(delay)
        # Every epoch's hours so far, those before a restart included (the checkpoint keeps the history).
        seconds = sum(h.get("train_s", 0.0) + h.get("val_s", 0.0) for h in trainers[-1].history)
        out = dict(metrics)
        out["gpu_hours"] = seconds / 3600.0 * gpus
        out["device_hours"] = seconds / 3600.0
        # Kept with the checkpoint, so that a restore from an older one can report this epoch again (_replay).
        atomic_write_text(last.parent / REPORTED, json.dumps(out))
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(last.parent)))

    retried: dict[str, float] = {}

    def report_with_retry(metrics: dict[str, float], last: Path) -> None:
        report({**metrics, **retried}, last)

    try:
        _replay(unregistered, work)
        try:
            _fit(cfg, work, report_with_retry, raw, trainers)
        except torch.OutOfMemoryError:
            if cfg.batch_size < 2:
                raise
            # Out of memory: once more with half the micro-batch and twice the accumulation (the same effective
            # batch for an even batch size), from the last checkpoint if an epoch was completed.
            smaller = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2, accumulation=cfg.accumulation * 2)
            log.warning("trial ran out of memory at batch %d; retrying at %d x %d", cfg.batch_size,
                        smaller.batch_size, smaller.accumulation)  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            retried.update(oom_retry=1.0, batch_size=smaller.batch_size, accumulation=smaller.accumulation)
            _fit(smaller, work, report_with_retry, raw, trainers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


WORK_PREFIX = "geopose-trial-"  # a trial's scratch directory in the node's temp dir: <prefix><host>.<pid>-<random>


def _work_dir(root: Path | None = None) -> Path:
    """A new scratch directory for the trial this process starts, after removing those that earlier trials left.

    A trial removes its own when it ends, but one that Tune pauses or stops may not get to (its actor ends while
    the training thread still waits in ``tune.report``), and a killed worker never does: each leftover holds the
    trial's last.pt and best.pt. Those of this host (a temp dir shared by containers holds others' too) left by a
    process that is gone, or by this one (Tune reuses the process for the next trial only once the last one's
    thread has ended), are removed; those of live processes, other hosts and unknown owners are kept."""
    root = Path(tempfile.gettempdir()) if root is None else root
    host = socket.gethostname().replace("/", "_")
    for d in root.glob(f"{WORK_PREFIX}*"):
        owner_host, _, pid = d.name[len(WORK_PREFIX) :].rpartition("-")[0].rpartition(".")
        if owner_host == host and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{host}.{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fit(cfg: TrainConfig, work: Path, on_epoch: Any, raw: dict[str, Any], trainers: list[Trainer]) -> None:
    trainers.append(Trainer(cfg, work, on_epoch=on_epoch))
    limit = raw.get("_faults", {}).get("oom_above_batch")
    if limit is not None and cfg.batch_size > int(limit):  # fault injection (tests): as a too-large batch does
        raise torch.OutOfMemoryError(f"simulated: batch {cfg.batch_size} > {limit} does not fit")
    trainers[-1].fit()

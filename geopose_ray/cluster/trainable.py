"""The Ray Tune function trainable: one TrainConfig trained with a checkpoint every epoch, the engine's retries
(out of memory, fp16 overflow: :mod:`geopose_ray.engine.retry`), and a scratch directory per trial.
"""

from __future__ import annotations

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
from geopose_ray.engine.retry import fit_with_retries
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
            for f in Path(d).glob("*.pt"):  # last.pt, best.pt and the top-k checkpoints
                shutil.copy(f, work / f.name)
        unregistered = _unregistered(checkpoint)
    elif raw.get("_resume_from"):  # continued in a reopened sweep: from its last checkpoint there
        copy_file(join(raw["_resume_from"], LAST), work / LAST)

    trainers: list[Trainer] = []  # the one running (a second after a retry)

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

    try:
        _replay(unregistered, work)
        fit_with_retries(cfg, work, report, faults=raw.get("_faults"), trainers=trainers)
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

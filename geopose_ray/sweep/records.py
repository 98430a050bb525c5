"""Trial keys, statuses and the records of trials: what names a trial in the promoter, the results table and
MLflow, and what ``trials.json`` holds. Pure: no Ray, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def trial_key(trial_id: str, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A trial's name in the promoter, the results table and MLflow, and its TrainConfig dict without the
    driver's private keys (``_threads``, ``_gpus``, ``_trial``, ``_finalist``, ``_resume_from``).

    The name is Tune's trial id, except for a finalist's fold run (``<screening trial>/fold<k>``) and a trial
    continued in a reopened sweep (``_trial``: the id it had when the sweep first ran it).
    """
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    parent = cfg.get("_finalist")
    if parent:
        return f"{parent}/fold{clean['val_fold']}", clean
    return str(cfg.get("_trial") or trial_id), clean


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's TrainConfig dict (with the driver's private keys), from either shape of param space: a
    grid point (``cfg``: the whole dict), or a searcher's draw (``sample``: encoder, decoder, lr, accumulation,
    built into a trial by the sweep config in ``sweep``, as the grid builds its points)."""
    if "cfg" in config:
        return dict(config["cfg"])
    if "sample" not in config:
        return {}
    from geopose_ray.sweep.config import SweepConfig

    s = config["sample"]
    built = SweepConfig.from_dict(config["sweep"]).trial_config(
        str(s["encoder"]), str(s["decoder"]), float(s["lr"]), int(s["accumulation"])
    )
    return {**built, **config.get("private", {})}


def per_epoch_hours(result: Mapping[str, Any]) -> float:
    """A trial's device hours per epoch from its last result (the wall-clock a run of it holds a worker for;
    GPU-hours where a result has no device hours); NaN if unknown."""
    epochs = float(result.get("epoch", 0) or 0)
    hours = float(result.get("device_hours") or result.get("gpu_hours") or math.nan)
    return hours / epochs if epochs > 0 else math.nan


def is_fold_run(pid: str) -> bool:
    """A finalist's run on another fold ("<trial>/fold<k>"), not a screening trial."""
    return "/fold" in pid


EPOCH_HOURS = "_epoch_hours"  # in a fold run's config: its finalist's device hours per epoch when screened

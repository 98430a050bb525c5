"""The ensemble job's Ray tasks: out-of-fold prediction, one task per fold, and test inference, one task per
shard of the test tiles. The work itself is :mod:`geopose_ray.ensemble.infer`'s, without Ray; this module only
spreads it over the cluster and turns a task's failure back into the worker's own error."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray

from geopose_ray.cluster.connect import connect
from geopose_ray.ensemble.fit import TileOof
from geopose_ray.ensemble.infer import Finish, ShardResult, oof_fold, predict_shard
from geopose_ray.ensemble.members import Member
from geopose_ray.errors import GeoposeError

log = logging.getLogger(__name__)


def gather(refs: list[Any]) -> list[Any]:
    """``ray.get`` of the job's tasks, in the order of ``refs``.

    Raises:
        GeoposeError: a worker's own error (a fold model that does not load or was trained at another resolution,
            a test tile of the wrong size), as itself, one line naming the file, not as Ray's task error with the
            worker's traceback. The tasks still unfinished are cancelled first.
    """
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        try:  # the other tasks' work is moot now: stop those still running rather than leave them
            # Only unfinished ones: Ray 2.60 aborts the driver ("Tried to complete task that was not pending") when
            # a cancel races with the completion of the task it cancels, as it did for the failed task itself.
            _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in unfinished:
                ray.cancel(ref)
            if unfinished:
                ray.wait(unfinished, num_returns=len(unfinished), timeout=60, fetch_local=False)
        except Exception as cleanup:  # the task's error, not this, is what the user needs
            log.warning("could not cancel the ensemble's other tasks (%s)", cleanup)
        if isinstance(e.cause, GeoposeError):
            raise e.cause from None
        raise


def shards(stems: Sequence[str], n: int) -> list[list[str]]:
    """``stems`` dealt round-robin into at most ``n`` non-empty shards."""
    return [s for s in (list(stems[i::n]) for i in range(n)) if s]


def oof_on_ray(
    members: list[Member], cache_path: str, folds: Sequence[int], tta: str, device: str, amp: str, gpus: float
) -> list[TileOof]:
    """Every fold's out-of-fold statistics (:func:`~geopose_ray.ensemble.infer.oof_fold`), one task of 1 CPU and
    ``gpus`` GPUs per fold, connected to the cluster first; the tiles of all folds, fold by fold."""
    connect()
    task: Any = ray.remote(oof_fold).options(num_cpus=1, num_gpus=gpus)
    parts = gather([task.remote(members, cache_path, k, tta, device, 1, amp) for k in folds])
    return [t for part in parts for t in part]


def predict_on_ray(
    members: list[Member],
    test_dir: str,
    stems: Sequence[str],
    out_dir: str,
    downsample: int,
    finish: Finish,
    tta: str,
    device: str,
    amp: str,
    tasks: int | None,
    gpus: float,
) -> list[ShardResult]:
    """The test tiles ``stems`` predicted into the submission at ``out_dir``
    (:func:`~geopose_ray.ensemble.infer.predict_shard`), in ``tasks`` parallel Ray tasks of 1 CPU and ``gpus``
    GPUs each (default: as many as the cluster's free CPUs, or its free GPUs / ``gpus``), never more than tiles.
    Returns one result per shard."""
    connect()
    if tasks is None:
        free = ray.available_resources()
        tasks = int(free.get("GPU", 0) / gpus) if gpus else int(free.get("CPU", 1))
    tasks = max(1, min(tasks, len(stems)))
    task: Any = ray.remote(predict_shard).options(num_cpus=1, num_gpus=gpus)
    return gather(
        [
            task.remote(members, test_dir, shard, out_dir, downsample, finish, tta, device, 1, amp)
            for shard in shards(stems, tasks)
        ]
    )

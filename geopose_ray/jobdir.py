"""A driver submitted as a Ray job (``ray job submit --working-dir . -- python sweeps/screen.py ...``) runs in
Ray's copy of the uploaded directory, under the Ray session's temp dir, and Ray deletes that copy once no job
uses it. A sweep, an MLflow database or a submission written there by a relative path would be lost with it, and
a later job (``--resume``, ``promote.py``, ``ensemble.py``) gets another copy and does not find it. The drivers
refuse such outputs before writing anything."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from geopose_ray.errors import DataError


def job_copy() -> Path | None:
    """This driver's working directory if it is Ray's copy of a job's ``working_dir`` (Ray connected, and its
    runtime environment has one), else None."""
    import ray

    if not ray.is_initialized() or not ray.get_runtime_context().runtime_env.get("working_dir"):
        return None
    return Path.cwd().resolve()


def mlflow_path(uri: str) -> Path | None:
    """The local file or directory an MLflow tracking URI writes to (``sqlite:///``, ``file:``, a plain path);
    None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return Path(urlsplit(uri).path)
    return None if scheme or uri in ("databricks", "databricks-uc", "uc") else Path(uri)


def refuse_outputs_in_job_copy(outputs: Iterable[tuple[str, str | Path | None, str]]) -> None:
    """Refuse any of ``outputs`` (what it is, its path, what to do instead) that lies in this Ray job's copy of
    its working directory. Does nothing outside a Ray job with a working directory.

    Raises:
        DataError: naming the output, its path and the copy.
    """
    copy = job_copy()
    if copy is None:
        return
    for what, path, instead in outputs:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved == copy or copy in resolved.parents:
            raise DataError(
                f"{what} {path} is in this Ray job's copy of its working directory ({copy}), which Ray deletes once "
                f"no job uses it: what the job writes there would be lost, and a later job would not find it. "
                f"{instead}"
            )


STORAGE_INSTEAD = "Give an absolute path outside it (--storage /path/on/the/head) or an object store (s3://, gs://)."
MLFLOW_INSTEAD = (
    "Set tracking_uri (or --tracking-uri) to an MLflow server (`launch/local.sh start mlflow` prints it) or to an "
    "absolute sqlite:////path outside it."
)

"""A driver submitted as a Ray job (``ray job submit --working-dir . -- python sweeps/screen.py ...``) runs in
Ray's unpacked copy of the uploaded directory, ``<Ray session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``.
That copy is not a place to keep results: Ray removes unused copies once they pass its cache size (10 GB by
default) and when the Ray session ends, and a job whose files differ runs in another copy, so a later job
(``--resume``, ``promote.py``, ``ensemble.py``) would not find them. A sweep, an MLflow store or a submission
written there by a relative path would be lost. The drivers refuse such outputs before they write anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from geopose_ray.errors import DataError

_COPIES = "working_dir_files"  # Ray's directory of unpacked working_dir packages
_PACKAGE = "_ray_pkg_"  # the prefix of each package's directory


def job_copy(cwd: Path | None = None) -> Path | None:
    """The Ray job working-directory copy that ``cwd`` (default: this process's) is in, or None. A
    ``local://`` working_dir or a ``ray.init(runtime_env=...)`` in a script runs in place: not a copy."""
    here = (cwd or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if d.name.startswith(_PACKAGE) and d.parent.name == _COPIES:
            return d
    return None


def mlflow_path(uri: str) -> Path | None:
    """The local file or directory an MLflow tracking URI writes to (``sqlite:///``, ``file:``, a plain path);
    None for a server or an in-memory database."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").partition("?")[0]
        return None if path in ("", ":memory:") else Path(path)
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return Path(urlsplit(uri).path)
    return None if scheme or uri in ("databricks", "databricks-uc", "uc") else Path(uri)


def refuse_outputs_in_job_copy(outputs: Iterable[tuple[str, str | Path | None, str]]) -> None:
    """Refuse any of ``outputs`` (what it is, its path, what to do instead) that lies in the Ray job
    working-directory copy this process runs in. Does nothing outside such a copy.

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
                f"{what} {path} is in this Ray job's copy of its working directory ({copy}), which Ray removes when "
                f"it needs the space or the Ray session ends, and which a later job does not see: what the job "
                f"writes there would be lost. {instead}"
            )


STORAGE_INSTEAD = "Give an absolute path outside it (--storage /path/on/the/head) or an object store (s3://, gs://)."
MLFLOW_INSTEAD = (
    "Set tracking_uri (or --tracking-uri) to an MLflow server (`launch/local.sh start mlflow` prints it), or, with "
    "a local storage path outside it, to an absolute sqlite:////path outside it."
)

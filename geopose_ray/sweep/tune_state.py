"""Tune's saved experiment state on a local or shared storage path, checked before a driver restores it.

Tune writes its state (``tuner.pkl``, ``experiment_state-<session>.json``, the searcher's and the callbacks'
``*-state-<session>`` files) to the driver's staging directory, each file renamed into place, and then copies the
staging directory to the storage path. That copy writes in place: a driver killed during it leaves a torn file on
storage (seen: an empty ``basic-variant-state-*.json``). Tune, given a torn file, logs the error and starts the
experiment over with an empty configuration, and the sweep's trials drop out of its results. So a driver that
resumes checks the newest file of each kind first (the one Tune loads), and mends a torn one from the staging copy
the killed driver left on this machine, or refuses, naming the file. An object store keeps an object only once its
upload is complete, so on a bucket there is nothing to check.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickletools
import shutil
import tempfile
from pathlib import Path

from geopose_ray.errors import DataError

log = logging.getLogger(__name__)

# Tune's state files in an experiment directory, by kind; of each, Tune loads the newest by name (`max`).
STATE_FILES = (
    "tuner.pkl",
    "experiment_state-*.json",
    "basic-variant-state-*.json",
    "search_gen_state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
)


def intact(path: Path) -> bool:
    """Whether a Tune state file is whole: the experiment state is JSON; the others are pickles (whatever their
    suffix), whose opcodes are read to the end without running any."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data:
        return False
    if path.name.startswith("experiment_state-"):
        try:
            json.loads(data)
        except ValueError:
            return False
        return True
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception:  # a torn pickle ends anywhere: an opcode, an argument or a string cut short
        return False
    return True


def newest(experiment: Path) -> list[Path]:
    """The state files Tune would load from ``experiment``: the newest of each kind there is."""
    found = []
    for pattern in STATE_FILES:
        paths = [p for p in experiment.glob(pattern) if p.is_file()]
        if paths:
            found.append(max(paths, key=lambda p: p.name))
    return found


def staging_roots() -> list[Path]:
    """Where Ray sessions on this machine keep their files (Tune stages an experiment's state under
    ``<root>/session_*/artifacts/<timestamp>/<experiment>/driver_artifacts``)."""
    roots: list[Path] = []
    try:
        import ray

        node = ray._private.worker._global_node
        if node is not None:
            roots.append(Path(node.get_session_dir_path()).parent)
    except (ImportError, AttributeError):
        pass
    default = Path(tempfile.gettempdir()) / "ray"
    return [*roots, default] if default not in roots else roots


def mend(experiment: str | os.PathLike[str], roots: list[Path] | None = None) -> list[str]:
    """Check Tune's newest state files in the local ``experiment`` directory; replace torn ones, and every state
    file staged with them, from the intact staging copy a killed driver left on this machine (the newest). Returns
    the names of the files replaced (none if all were whole).

    Raises:
        DataError: a file is torn and no intact staging copy of it is left here; nothing was changed.
    """
    directory = Path(os.fspath(experiment).removeprefix("file://"))
    files = newest(directory)
    torn = [p for p in files if not intact(p)]
    if not torn:
        return []
    # The killed driver's own staging copy: it holds the newest experiment state by name (the driver's session
    # time, to the second), not another sweep's of the same name; and intact copies of every torn file.
    session = [p.name for p in files if p.name.startswith("experiment_state-")]
    roots = staging_roots() if roots is None else roots
    staged = [
        d
        for root in roots
        for d in root.glob(f"session_*/artifacts/*/{directory.name}/driver_artifacts")
        if session and (d / session[0]).is_file() and all(intact(d / p.name) for p in torn)
    ]
    if not staged:
        names = ", ".join(p.name for p in torn)
        raise DataError(
            f"{directory}: Tune's saved state of this sweep stage is torn ({names}: empty or cut short), as a driver "
            "killed while Tune copied it there leaves it, and no intact copy is staged on this machine. Nothing was "
            "changed; the trials' checkpoints are intact. Run --resume on the head the killed driver ran on, or "
            "copy an intact file there from its staging directory (under /tmp/ray/session_*/artifacts), or start "
            "the sweep over without --resume"
        )
    source = max(staged, key=lambda d: max((d / p.name).stat().st_mtime_ns for p in torn))
    replaced = []
    for pattern in STATE_FILES:
        for copy in source.glob(pattern):
            if copy.is_file() and intact(copy):
                tmp = directory / f".{copy.name}.mending"
                shutil.copyfile(copy, tmp)
                os.replace(tmp, directory / copy.name)
                replaced.append(copy.name)
    log.warning(
        "%s: Tune's saved state was torn (%s); restored %s from the staging copy in %s",
        directory, ", ".join(p.name for p in torn), ", ".join(replaced), source,
    )  # fmt: skip
    return replaced

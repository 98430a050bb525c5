"""Tune's saved experiment state on a local or shared storage path, checked before a driver restores it.

Tune writes its state (``experiment_state-<session>.json``, the searcher's and the callbacks' ``*-state-<session>``
files) to the driver's staging directory on the head, and then copies the staging directory to the storage path;
``tuner.pkl`` goes to the storage path when the sweep starts. The copy writes each file in place: a driver killed
during it leaves a torn file on storage (seen: an empty ``basic-variant-state-*.json``). Tune, given a torn file,
logs the error and starts the experiment over (seen: one trial with an empty configuration), and the sweep's
trials drop out of its results. So a driver that resumes checks the newest file of each kind first (the one Tune
loads), and mends a torn one from the staging copy the killed driver left on this head, or refuses, naming the
file. An object store keeps an object only once its upload is complete, so on a bucket there is nothing to check.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickletools
import tempfile
from pathlib import Path

from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_bytes

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
    return _whole(path.name, data)


def _whole(name: str, data: bytes) -> bool:
    """:func:`intact` of a state file named ``name`` holding ``data``."""
    if not data:
        return False
    if name.startswith("experiment_state-"):
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
    """Check Tune's newest state files in the local ``experiment`` directory; if one is torn, replace the whole
    set from the staging copy a killed driver left on this head. Returns the names of the files replaced (none if
    all were whole).

    A staging directory qualifies only if it holds the newest file of every kind on storage by name (the same
    driver sessions, not another sweep's of the same name or an older set) and an intact copy of each torn one.

    Raises:
        DataError: a file is torn and no staging copy qualifies, or the copy failed; the files on storage are
            then as they were, or whole copies of the staging set.
    """
    directory = Path(os.fspath(experiment).removeprefix("file://"))
    files = newest(directory)
    torn = [p for p in files if not intact(p)]
    if not torn:
        return []
    roots = staging_roots() if roots is None else roots
    staged = [
        d
        for root in roots
        for d in root.glob(f"session_*/artifacts/*/{directory.name}/driver_artifacts")
        if all((d / p.name).is_file() for p in files if p.name != "tuner.pkl") and all(intact(d / p.name) for p in torn)
    ]
    names = ", ".join(p.name for p in torn)
    if not staged:
        raise DataError(
            f"{directory}: Tune's saved state of this sweep stage is torn ({names}: empty or cut short), as a driver "
            "killed while Tune copied it there leaves it, and no intact copy is staged on this head. Nothing was "
            "changed; the trials' checkpoints are intact. Run --resume on the head the killed driver ran on, or "
            "copy an intact file there from its staging directory (under /tmp/ray/session_*/artifacts), or start "
            "the sweep over without --resume"
        )
    source = max(staged, key=lambda d: max((d / p.name).stat().st_mtime_ns for p in torn))
    replaced = []
    try:
        for pattern in STATE_FILES:
            for copy in sorted(source.glob(pattern)):
                data = copy.read_bytes() if copy.is_file() else b""
                if _whole(copy.name, data):
                    atomic_write_bytes(directory / copy.name, data)
                    replaced.append(copy.name)
    except OSError as e:
        raise DataError(f"{directory}: cannot mend Tune's torn state ({names}) from {source} ({e})") from e
    still = [p.name for p in newest(directory) if not intact(p)]
    if still:
        raise DataError(f"{directory}: Tune's state is still torn ({', '.join(still)}) after mending it from {source}")
    log.warning("%s: Tune's saved state was torn (%s); restored %s from the staging copy in %s",
                directory, names, ", ".join(replaced), source)  # fmt: skip
    return replaced

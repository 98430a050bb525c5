"""A sweep's own files: the results table, the promoter's state and the trial records.

They live beside Tune's experiments, in ``<storage_path>/<name>/`` (the sweep's *home*), so that every later job
finds them on any head: ``sweeps/screen.py --resume`` after the head was lost, ``sweeps/promote.py``,
``sweeps/ensemble.py``. On an object store the driver also keeps a working copy of each in its own directory
(``runs/<name>/``), written first on every change (MLflow's artifacts are uploaded from it) and brought up to
date from the home when a driver that continues the sweep starts (:meth:`SweepFiles.pull`).

A write to the home that fails while the sweep runs (the store unreachable for a while) is logged once and
tried again at a later change, at most every :data:`BACKOFF_S` seconds, so that the sweep does not wait on the
store at every result; one at the end of a stage must succeed, or the driver stops with an error that names the
working copy to upload. Until a working copy has reached the home it is marked pending: the next driver that
continues the sweep from that directory uploads it, unless the home's file is newer (the sweep went on
elsewhere), which is kept, the working copy set aside beside it with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from geopose_ray.errors import DataError, GeoposeError
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.storage import is_remote, join, read_text, redact, remove, stat, write_text

log = logging.getLogger(__name__)

PROMOTER = "promoter.json"
TRIALS = "trials.json"
RESULTS = "results.csv"
STATE = (PROMOTER, TRIALS, RESULTS)
RETRIES = (1.0, 4.0)  # seconds between the tries of a write that must succeed
BACKOFF_S = 60.0  # after a failed write while the sweep runs, the home is not tried again for this long


@dataclass
class SweepFiles:
    """Where a sweep's own files are: ``home`` (a local directory, or a URI on the sweep's object store) and,
    for a remote home, the local working copies in ``local``."""

    home: str
    local: Path
    _retry_at: dict[str, float] = field(default_factory=dict, compare=False, repr=False)  # failing file -> when

    @property
    def remote(self) -> bool:
        return is_remote(self.home)

    def location(self, name: str) -> str:
        """Where file ``name`` lives (a path, or a URI with its credentials: :func:`redact` it to show it)."""
        return join(self.home, name)

    def read(self, name: str) -> str | None:
        """File ``name`` as the home has it (None: not there)."""
        return read_text(self.location(name))

    def working_copy(self, name: str) -> str | None:
        """File ``name`` as this driver last wrote it (the home itself when it is local)."""
        path = self.local / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def _pending(self, name: str) -> Path:
        return self.local / f".{name}.pending"

    def pull(self) -> None:
        """Bring the working copies up to date before a driver continues the sweep: from the home (another job or
        head may have changed it since this directory last saw it; a file the home no longer has is dropped), or,
        for a working copy that never reached the home, the other way round unless the home's is newer.

        Raises:
            GeoposeError: a pending working copy cannot be uploaded.
        """
        if not self.remote:
            return
        self.local.mkdir(parents=True, exist_ok=True)
        for name in STATE:
            mine, pending = self.local / name, self._pending(name)
            if mine.is_file() and pending.exists():
                theirs = stat(self.location(name))
                if theirs is None or theirs[1] < mine.stat().st_mtime_ns:
                    self.write(name, mine.read_text(encoding="utf-8"))
                    continue
                aside = mine.with_name(f"{name}.unsent-{time.strftime('%Y%m%dT%H%M%S')}")
                mine.replace(aside)
                pending.unlink()
                log.warning(
                    "%s was never uploaded, and the sweep has a newer %s (it went on elsewhere): that one is kept, "
                    "this one set aside as %s", mine, name, aside,
                )  # fmt: skip
            text = self.read(name)
            if text is None:
                mine.unlink(missing_ok=True)
            else:
                atomic_write_text(mine, text)

    def write(self, name: str, text: str, required: bool = True) -> None:
        """Write file ``name``: the working copy, then the home. ``required=False`` (the writes while a sweep
        runs) never raises: a failure is logged once, and the next write after :data:`BACKOFF_S` catches up.

        Raises:
            GeoposeError: ``required`` and the file could not be written, after retries for the home.
        """
        if required:
            self._write(name, text, RETRIES)
            return
        try:
            self._write(name, text, ())
        except Exception as e:  # Tune's event loop calls this: nothing may escape
            if name not in self._retry_at:
                log.warning("%s; the sweep goes on, and writes it again at a later change", e)
            self._retry_at[name] = time.monotonic() + BACKOFF_S

    def _write(self, name: str, text: str, waits: tuple[float, ...]) -> None:
        pending = self._pending(name)
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.local / name, text)
            copied = True
        except OSError as e:
            if waits and not self.remote:
                raise GeoposeError(f"{self.local / name}: cannot write the sweep's {name} ({e})") from e
            log.warning("%s: cannot write the sweep's %s (%s)", self.local / name, name, e)
            copied = False
            with contextlib.suppress(OSError):  # an older working copy must not go up later
                pending.unlink(missing_ok=True)
        if not self.remote:
            return
        if copied:
            pending.touch()  # until the home has it
        if not waits and time.monotonic() < self._retry_at.get(name, -1.0):
            return  # the home failed a moment ago: the working copy stays pending, a later write catches up
        for attempt in range(len(waits) + 1):
            try:
                write_text(self.location(name), text)
                break
            except DataError as e:
                if attempt == len(waits):
                    if not waits:
                        raise
                    raise GeoposeError(
                        f"{e}. The sweep's current {name} is {(self.local / name).resolve()}: copy it to "
                        f"{redact(self.location(name))} before another job reads the sweep (a driver that "
                        "continues the sweep from this directory uploads it first)"
                    ) from e
                time.sleep(waits[attempt])
        with contextlib.suppress(OSError):
            pending.unlink(missing_ok=True)
        if self._retry_at.pop(name, None) is not None:
            log.warning("the sweep's storage is writable again: %s is current", redact(self.location(name)))

    def remove(self, names: tuple[str, ...]) -> None:
        """Delete files ``names``, working copies and home (a sweep started afresh)."""
        for name in names:
            (self.local / name).unlink(missing_ok=True)
            self._pending(name).unlink(missing_ok=True)
            if self.remote:
                remove(self.location(name))

"""A sweep's own files: the results table, the promoter's state and the trial records.

They live beside Tune's experiments, in ``<storage_path>/<name>/`` (the sweep's *home*), so that every later job
finds them on any head: ``sweeps/screen.py --resume`` after the head was lost, ``sweeps/promote.py``,
``sweeps/ensemble.py``. On an object store the driver also keeps a working copy of each in its own directory
(``runs/<name>/``): it is brought up to date from the home when a driver starts (:meth:`SweepFiles.pull`) and
written first on every change, and MLflow's artifacts are uploaded from it. A write to the home that fails while
the sweep runs (the store unreachable for a while) is retried at the next change; one at the end of a stage must
succeed, or the driver stops with an error that names the working copy to upload.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from geopose_ray.errors import DataError, GeoposeError
from geopose_ray.fsutil import atomic_write_text
from geopose_ray.storage import is_remote, join, read_text, redact, remove, write_text

log = logging.getLogger(__name__)

PROMOTER = "promoter.json"
TRIALS = "trials.json"
RESULTS = "results.csv"
STATE = (PROMOTER, TRIALS, RESULTS)
RETRIES = (1.0, 4.0)  # seconds between the tries of a write that must succeed


@dataclass
class SweepFiles:
    """Where a sweep's own files are: ``home`` (a local directory, or a URI on the sweep's object store) and,
    for a remote home, the local working copies in ``local``."""

    home: str
    local: Path
    _failing: bool = field(default=False, compare=False, repr=False)  # the last write to the home failed

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

    def pull(self) -> None:
        """Bring the working copies up to date from the home (a remote home: another job, or another head, may
        have changed the sweep since this directory last saw it)."""
        if not self.remote:
            return
        self.local.mkdir(parents=True, exist_ok=True)
        for name in STATE:
            text = self.read(name)
            if text is not None:
                atomic_write_text(self.local / name, text)

    def write(self, name: str, text: str, required: bool = True) -> None:
        """Write file ``name``: the working copy, then the home. ``required=False`` (the writes while a sweep
        runs) logs a failure to reach the home once and leaves the next write to catch up.

        Raises:
            GeoposeError: ``required`` and the home could not be written after retries.
        """
        self.local.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.local / name, text)
        if not self.remote:
            return
        waits = RETRIES if required else ()
        error: DataError | None = None
        for attempt in range(len(waits) + 1):
            try:
                write_text(self.location(name), text)
                if self._failing:
                    log.warning("the sweep's storage is writable again: %s is current", redact(self.location(name)))
                self._failing = False
                return
            except DataError as e:
                error = e
                if attempt < len(waits):
                    time.sleep(waits[attempt])
        if required:
            raise GeoposeError(
                f"{error}. The sweep's current {name} is {(self.local / name).resolve()}: copy it to "
                f"{redact(self.location(name))} before another job reads the sweep"
            )
        if not self._failing:
            log.warning("%s; the sweep goes on, and writes it again at its next change", error)
        self._failing = True

    def remove(self, names: tuple[str, ...]) -> None:
        """Delete files ``names``, working copies and home (a sweep started afresh)."""
        for name in names:
            (self.local / name).unlink(missing_ok=True)
            if self.remote:
                remove(self.location(name))

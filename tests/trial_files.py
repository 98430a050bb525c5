"""What a Ray Tune trial directory says about the epochs a trial trained."""

from __future__ import annotations

import json
from pathlib import Path


def epochs_once(trial_dir: Path) -> list[int]:
    """The distinct epochs a trial reported (its result.json), after asserting that none was trained twice.

    An epoch may appear again only marked ``replayed``: after a restore from an older checkpoint than one the
    trial had persisted, it reports that epoch again from its checkpoint without training it. Tune may drop the
    original line of such an epoch from result.json, so the distinct epochs, not the lines, are returned.
    """
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    trained = [int(r["epoch"]) for r in results if not r.get("replayed")]
    assert len(trained) == len(set(trained)), (trial_dir.name, [(r["epoch"], r.get("replayed")) for r in results])
    return sorted({int(r["epoch"]) for r in results})

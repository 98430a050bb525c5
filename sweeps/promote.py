"""Reopen a finished sweep: raise its GPU-hour budget, add a rung above the top one, or both: ``geopose-ray sweep
promote``, as a script a Ray job runs.

ray job submit --working-dir . -- python sweeps/promote.py --config launch/sweeps/screen-t4-cloud.yaml --budget 400
python sweeps/promote.py --config sweeps/configs/demo.yaml --add-rung 16
"""

from __future__ import annotations

import sys

from geopose_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    """``geopose-ray sweep promote`` with ``argv`` (default the command line's); its exit code."""
    return cli(["sweep", "promote", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

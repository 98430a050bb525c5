"""Turn a finished sweep's finalists into a challenge submission: ``geopose-ray sweep ensemble``, as a script a
Ray job runs.

ray job submit --working-dir . -- python sweeps/ensemble.py --config launch/sweeps/screen-t4-cloud.yaml \
    --test /data/geopose/test --out /home/ray/submission   # a job needs absolute paths
python sweeps/ensemble.py --config sweeps/configs/demo.yaml --test runs/demo/data/test --truth runs/demo/data/test_truth
"""

from __future__ import annotations

import sys

from geopose_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    """``geopose-ray sweep ensemble`` with ``argv`` (default the command line's); its exit code."""
    return cli(["sweep", "ensemble", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

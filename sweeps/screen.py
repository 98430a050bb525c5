"""Screen a grid with the promoter on Ray Tune, then train the finalists on every fold: ``geopose-ray sweep
screen``, as a script a Ray job runs.

ray job submit --working-dir . -- python sweeps/screen.py --config sweeps/configs/demo.yaml \
    --cache "$PWD/runs/demo/cache" --storage "$PWD/runs/demo/sweeps"   # a job needs absolute paths
python sweeps/screen.py --config sweeps/configs/screen-t4.yaml --smoke-test   # a tiny version, locally
"""

from __future__ import annotations

import sys

from geopose_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    """``geopose-ray sweep screen`` with ``argv`` (default the command line's); its exit code."""
    return cli(["sweep", "screen", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""A sweep on Ray's own fake multi-node autoscaling cluster: pending GPU trials make the autoscaler add "t4"
workers (min 0), and the workers go away once idle."""

from __future__ import annotations

import csv
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from ray_heads import BIN, Head, fake_t4_cluster, ray_head

ROOT = Path(__file__).resolve().parents[1]


def _events(head: Head, pattern: str) -> int:
    """The number of nodes named by the autoscaler's event-summary lines matching ``pattern`` (one group)."""
    text = "".join(p.read_text(errors="replace") for p in head.logs.glob("monitor*.log"))
    return sum(int(n) for n in re.findall(pattern, text))


@pytest.mark.slow
@pytest.mark.cluster
def test_pending_gpu_trials_scale_t4_workers_up_and_idle_ones_down(cache: Path, tmp_path: Path) -> None:
    config = {
        "name": "autoscale",
        "cache": str(cache),
        "grid": {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3, 3e-3], "accumulation": [1]},
        "train": {"batch_size": 4},
        "rungs": [1, 2],
        "eta": 2,
        "cpus_per_trial": 1,
        "gpus_per_trial": 1,  # only a t4 worker has a GPU: the head (0 CPUs) cannot run a trial
        "storage_path": str(tmp_path / "sweeps"),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    added = r"Adding (\d+) node\(s\) of type t4"
    removed = r"Removing (\d+) nodes of type t4 \(idle\)"
    with ray_head(num_cpus=0, autoscaling=fake_t4_cluster("", max_workers=2, idle_minutes=0.1)) as head:
        time.sleep(6)  # a few autoscaler rounds with nothing pending
        assert _events(head, added) == 0, "min_workers is 0: no t4 worker before trials are pending"
        env = {**head.env, "RAY_ADDRESS": head.gcs_address}
        cmd = [str(BIN / "python"), "sweeps/screen.py", "--config", str(tmp_path / "sweep.yaml")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        n_added = _events(head, added)
        assert n_added >= 1, "pending trials must make the autoscaler add t4 workers"
        deadline = time.monotonic() + 120
        while _events(head, removed) < n_added and time.monotonic() < deadline:
            time.sleep(2)
        assert _events(head, removed) == n_added, "every t4 worker must be removed once idle"
    rows = list(csv.DictReader((tmp_path / "sweeps" / "autoscale" / "results.csv").open()))
    screen = [r for r in rows if r["stage"] == "screen"]
    folds = [r for r in rows if r["stage"] == "fold"]
    assert len(screen) == 2 and all(int(r["epoch"]) >= 1 for r in screen)
    assert len(folds) == 3 and all(r["status"] == "done" and int(r["epoch"]) == 2 for r in folds)

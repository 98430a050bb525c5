"""`ray job submit` against a local `ray start --head`, as users launch a sweep; a job refuses to write its sweep
into Ray's temporary copy of its working directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_heads import BIN, ray_head, submit

from geopose_ray.jobdir import mlflow_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def head() -> Iterator[tuple[str, dict[str, str]]]:
    with ray_head(num_cpus=2) as h:
        yield h.dashboard, h.env


def test_mlflow_stores_are_found_in_tracking_uris() -> None:
    assert mlflow_path("sqlite:////srv/mlflow.db") == Path("/srv/mlflow.db")
    assert mlflow_path("sqlite:///runs/mlflow.db") == Path("runs/mlflow.db")  # relative: three slashes
    assert mlflow_path("file:///srv/mlruns") == Path("/srv/mlruns") and mlflow_path("mlruns") == Path("mlruns")
    assert mlflow_path("http://127.0.0.1:5000") is None and mlflow_path("databricks") is None


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_job_submit_runs_the_screen(head: tuple[str, dict[str, str]], cache: Path, tmp_path: Path) -> None:
    address, env = head
    job = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "sweeps/screen.py", "--config", "sweeps/configs/demo.yaml", "--smoke-test",
           "--cache", str(cache)]  # fmt: skip

    # demo.yaml's relative storage path would put the sweep in Ray's temporary copy of the working directory.
    refused = submit(job, env, ROOT)
    assert refused.returncode != 0
    assert "screen: error: storage_path runs/demo/sweeps is in this Ray job's copy of its working directory" in (
        refused.stdout
    ), refused.stdout[-3000:]
    assert "Traceback" not in refused.stdout
    # A storage path outside the copy, with MLflow's default database in it: the default is beside the sweep.
    storage = tmp_path / "sweeps"
    done = submit([*job, "--storage", str(storage)], env, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finalists: [" in done.stdout
    assert (storage / "demo-smoke" / "results.csv").exists()
    assert (storage / "demo-smoke" / "mlflow.db").exists()

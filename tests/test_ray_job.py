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
    assert mlflow_path("sqlite:///runs/mlflow.db?timeout=5") == Path("runs/mlflow.db")  # relative: three slashes
    assert mlflow_path("file:///srv/mlruns") == Path("/srv/mlruns") and mlflow_path("mlruns") == Path("mlruns")
    assert mlflow_path("http://127.0.0.1:5000") is None and mlflow_path("databricks") is None
    assert mlflow_path("sqlite:///:memory:") is None


def test_outputs_in_a_job_copy_of_the_working_directory_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a directory laid out as Ray unpacks a job's working_dir (the real layout is the job test below), every
    output a driver would write there is refused, naming it; outputs outside it pass; elsewhere nothing is."""
    from geopose_ray.errors import DataError
    from geopose_ray.sweep.config import SweepConfig

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "sweeps").mkdir(parents=True)
    bucket = "s3://bucket/sweeps"
    server = "http://127.0.0.1:5000"
    refused = {
        "relative storage": ({"storage_path": "runs"}, r"^storage_path runs is in this Ray job's copy"),
        "bucket, default MLflow": (
            {"storage_path": bucket},
            r"^MLflow.s default database \(tracking_uri is not set\) /.*_ray_pkg_0123abcd/sweeps/runs/s/mlflow.db is",
        ),
        "bucket, absolute SQLite": (
            {"storage_path": bucket, "tracking_uri": f"sqlite:///{tmp_path}/m.db"},
            r"^MLflow's artifact directory runs/s/mlartifacts is in .*Set tracking_uri to an MLflow server",
        ),
        "relative SQLite": (
            {"storage_path": str(tmp_path / "out"), "tracking_uri": "sqlite:///m.db"},
            r"^MLflow's database m.db is in",
        ),
    }
    monkeypatch.chdir(copy / "sweeps")  # a subdirectory of the copy is in it too
    for case, (settings, message) in refused.items():
        cfg = SweepConfig.from_dict({"name": "s", "cache": str(tmp_path), **settings})
        with pytest.raises(DataError, match=message):
            cfg.refuse_outputs_in_job_copy()
            pytest.fail(case)
    fine = SweepConfig.from_dict({"name": "s", "cache": str(tmp_path), "storage_path": bucket, "tracking_uri": server})
    fine.refuse_outputs_in_job_copy()
    with pytest.raises(DataError, match=r"^the ensemble's output directory out is in .*Give --out an absolute path"):
        fine.refuse_outputs_in_job_copy(("the ensemble's output directory", "out", "Give --out an absolute path."))
    fine.refuse_outputs_in_job_copy(("the ensemble's output directory", tmp_path / "out", "-"))
    monkeypatch.chdir(tmp_path)  # not a job's copy: relative paths are the user's own
    SweepConfig.from_dict({"name": "s", "cache": str(tmp_path), "storage_path": "runs"}).refuse_outputs_in_job_copy()


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

"""Load: many short trials through the promoter on the local Ray, tracked on the session's real `mlflow server`.

Two sizes of one test (docs/testing.md): the suite runs 30 trials, `make soak` the 300 of docs/benchmarks/load.md's
reliability table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_load import MlflowServer, run_load


@pytest.mark.slow
@pytest.mark.parametrize("trials", [30, pytest.param(300, marks=pytest.mark.soak)])
def test_trials_lose_no_metric_and_raise_no_scheduler_error(
    mlflow_server: MlflowServer, tmp_path: Path, trials: int
) -> None:
    out = run_load(trials, tmp_path, uri=mlflow_server.uri, experiment=f"load-{trials}")
    assert out["trials"] == trials and out["errored_trials"] == 0 and out["scheduler_errors"] == 0
    assert out["fold_runs"] >= 1  # promotions happened under the load, and their fold runs
    assert out["runs_in_mlflow"] == out["trials"] + out["fold_runs"] and out["duplicate_runs"] == 0
    assert out["epochs_in_mlflow"] == out["epochs_reported"] and out["duplicate_epochs"] == 0
    assert out["trials_with_lost_or_extra_epochs"] == 0
    assert out["mlflow_calls"] > out["epochs_reported"] and out["mlflow_latency_median_ms"] > 0

"""Load: 300 short trials through the promoter on the local Ray, tracked on a real `mlflow server`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_load import run_load


@pytest.mark.slow
def test_300_trials_lose_no_metric_and_raise_no_scheduler_error(tmp_path: Path) -> None:
    out = run_load(300, tmp_path)
    assert out["trials"] == 300 and out["errored_trials"] == 0 and out["scheduler_errors"] == 0
    assert out["runs_in_mlflow"] == out["trials"] + out["fold_runs"] and out["duplicate_runs"] == 0
    assert out["epochs_in_mlflow"] == out["epochs_reported"] and out["duplicate_epochs"] == 0
    assert out["trials_with_lost_or_extra_epochs"] == 0
    assert out["mlflow_calls"] > out["epochs_reported"] and out["mlflow_latency_median_ms"] > 0

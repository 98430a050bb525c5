"""MLflow tracking: runs created once and reattached, and a tracking server that goes away and comes back."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from bench_load import MlflowServer

from geopose_ray.sweep.table import trial_params
from geopose_ray.tracking import Tracker

CFG = {"model": {"encoder": "resnet34", "decoder": "Unet", "weights": None}, "lr": 1e-4, "accumulation": 4,
       "batch_size": 2, "val_fold": 0, "epochs": 20}  # fmt: skip


def test_runs_are_created_once_and_reattached(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "exp", "sweep-a", str(tmp_path / "art"))
    parent = t.parent({"name": "sweep-a", "eta": 3})
    run = t.trial("trial-1", CFG, "screen")
    assert run.id is not None
    for epoch in (1, 2):
        t.metrics(run, {"score": 0.1 * epoch, "train/total": 3.0, "bad": float("nan")}, epoch)
    t.tags(run, {"status": "paused", "rung": 1})
    again = Tracker(uri, "exp", "sweep-a")  # a restarted driver
    assert again.parent() == parent and again.trial("trial-1", CFG, "screen") == run
    assert len(again.runs()) == 1
    data = again._client.get_run(run.id).data
    assert data.params["encoder"] == "resnet34" and data.params["effective_batch"] == "8"
    assert data.tags["status"] == "paused" and data.tags["mlflow.parentRunId"] == parent.id
    history = again._client.get_metric_history(run.id, "score")
    assert [m.step for m in history] == [1, 2] and "bad" not in data.metrics
    assert "train_total" in data.metrics


def test_a_run_created_while_the_server_is_down_gets_its_params_metrics_tags_and_end_once_it_is_back(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """The server is down before the sweep's first call: the parent run and a trial's run are handles at once, and
    every call against them waits for their creation. Once the server is back each run exists once, under its
    parent, with its params, every epoch once, its last tags and its end; of a file logged twice meanwhile (the
    results table, rewritten), only the newest copy waits and arrives."""
    mlflow_server.stop()
    t = Tracker(mlflow_server.uri, "exp-down", "sweep-c")
    parent = t.parent({"eta": 3})
    run = t.trial("trial-1", CFG, "screen")
    assert run.id is None and parent.id is None
    for epoch in (1, 2, 3):
        t.metrics(run, {"score": 0.1 * epoch}, epoch)
    t.tags(run, {"status": "paused"})
    t.tags(run, {"status": "finalist"})
    table = tmp_path / "results.csv"
    for version in ("first", "second"):
        table.write_text(version)
        t.artifact(parent, table)
    t.finish(run)
    assert t.trial("trial-1", CFG, "screen") is run and t.pending == 9  # 2 creations, 3 epochs, 2 tags, 1 file, 1 end
    mlflow_server.start()
    assert t.flush(timeout_s=30) and run.id is not None and parent.id is not None
    again = Tracker(mlflow_server.uri, "exp-down", "sweep-c")
    [found] = again.runs()
    assert found.info.run_id == run.id and found.info.status == "FINISHED"
    assert found.data.tags["mlflow.parentRunId"] == parent.id and found.data.tags["status"] == "finalist"
    assert found.data.params["encoder"] == "resnet34"
    assert again._client.get_run(parent.id).data.params == {"eta": "3"}
    history = again._client.get_metric_history(run.id, "score")
    assert sorted(m.step for m in history) == [1, 2, 3]
    got = again._client.download_artifacts(parent.id, "results.csv", str(tmp_path / "back"))
    assert Path(got).read_text() == "second"


class _FlakyClient:
    """An MLflow client whose next ``fail`` calls of ``log_batch`` raise, as a server that drops the connection
    after it created a run."""

    def __init__(self, real: Any) -> None:
        self.real, self.fail, self.created = real, 0, 0

    def create_run(self, *a: Any, **kw: Any) -> Any:
        self.created += 1
        return self.real.create_run(*a, **kw)

    def log_batch(self, *a: Any, **kw: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("connection reset")
        return self.real.log_batch(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_run_created_whose_params_were_lost_is_not_created_again(tmp_path: Path) -> None:
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "sweep-d", str(tmp_path / "art"))
    t.parent()
    flaky = t._client = _FlakyClient(t._client)
    flaky.fail = 1
    run = t.trial("trial-1", CFG, "screen")
    t.metrics(run, {"score": 0.5}, 1)
    assert run.id is not None and t.pending == 2  # created; its params and the epoch wait (RETRY_S)
    assert t.flush() and flaky.created == 1
    data = flaky.real.get_run(run.id).data
    assert data.params["encoder"] == "resnet34" and data.metrics == {"score": 0.5}
    assert [r.info.run_id for r in t.runs()] == [run.id]


def test_trial_params_flatten_the_config() -> None:
    p = trial_params({**CFG, "augment": {"rot90": True}})
    assert p["lr"] == "0.0001" and p["augment.rot90"] == "True" and p["effective_batch"] == "8"


def test_a_dead_server_loses_nothing_and_duplicates_nothing(mlflow_server: MlflowServer) -> None:
    t = Tracker(mlflow_server.uri, "exp", "sweep-b")
    run = t.trial("trial-1", CFG, "screen")
    assert run.id is not None
    t.metrics(run, {"score": 0.1}, 1)
    mlflow_server.stop()  # the tracking server dies mid-sweep
    start = time.monotonic()
    for epoch in (2, 3, 4):
        t.metrics(run, {"score": 0.1 * epoch}, epoch)  # must not raise, nor hang
    t.tags(run, {"status": "paused"})
    assert time.monotonic() - start < 30
    assert t.pending >= 3
    mlflow_server.start()
    assert t.flush(timeout_s=30)
    client = Tracker(mlflow_server.uri, "exp", "sweep-b")._client
    assert sorted(m.step for m in client.get_metric_history(run.id, "score")) == [1, 2, 3, 4]  # every epoch, once
    assert client.get_run(run.id).data.tags["status"] == "paused"


@pytest.mark.slow
def test_a_sweep_survives_a_tracking_outage_and_every_epoch_reaches_mlflow_once(
    mlflow_server: MlflowServer, cache: Path, tmp_path: Path
) -> None:
    """Stop the `mlflow server` once the sweep has reported its first epoch and start it again seconds later:
    training never stops, and afterwards every trial has one run holding every epoch once, with its final
    status."""
    import csv

    import yaml

    root = Path(__file__).resolve().parents[1]
    sweep = {
        "name": "o", "cache": str(cache), "storage_path": str(tmp_path / "runs"), "rungs": [1, 2, 3], "eta": 2,
        "grid": {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3, 3e-3], "accumulation": [1, 2]},
        "train": {"batch_size": 4}, "tracking_uri": mlflow_server.uri,
    }  # fmt: skip
    y = tmp_path / "o.yaml"
    y.write_text(yaml.safe_dump(sweep))
    proc = subprocess.Popen(
        [sys.executable, str(root / "sweeps" / "screen.py"), "--config", str(y)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    screen = tmp_path / "runs" / "o-screen"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.read_text().count("\n") >= 1 for p in screen.glob("*/result.json")):
            break
        time.sleep(0.05)
    mlflow_server.stop()  # the tracking server dies mid-sweep
    epochs_at_stop = sum(p.read_text().count("\n") for p in screen.glob("*/result.json"))
    time.sleep(8)
    epochs_in_outage = sum(p.read_text().count("\n") for p in screen.glob("*/result.json")) - epochs_at_stop
    mlflow_server.start()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert epochs_in_outage > 0, "training must go on while the server is down"
    rows = list(csv.DictReader((tmp_path / "runs" / "o" / "results.csv").open()))
    t = Tracker(mlflow_server.uri, "o", "o")
    runs = t.runs()
    assert sorted(r.data.tags["trial"] for r in runs) == sorted(r["trial"] for r in rows)  # once each
    by_key = {r.data.tags["trial"]: r for r in runs}
    for row in rows:
        run = by_key[row["trial"]]
        steps = [m.step for m in t._client.get_metric_history(run.info.run_id, "score")]
        assert sorted(steps) == list(range(1, int(row["epoch"]) + 1)), (row["trial"], steps)  # every epoch, once
        assert run.data.tags["status"] == row["status"]

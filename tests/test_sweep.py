"""The sweep: config validation before Ray starts, and a real screening run on a local Ray cluster."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from trial_files import epochs_once

from geopose_ray.errors import ConfigError
from geopose_ray.models.config import ModelConfig, resolve_decoder, resolve_model
from geopose_ray.sweep.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]


def _cfg(cache_dir: Path, tmp_path: Path, **over: Any) -> SweepConfig:
    raw: dict[str, Any] = {
        "name": "t",
        "cache": str(cache_dir),
        "grid": {
            "encoders": ["tu-test_resnet"],
            "decoders": ["Unet"],
            "lrs": [1e-3, 3e-3, 1e-2],
            "accumulation": [1, 2],
        },
        "train": {"batch_size": 4, "augment": None},
        "rungs": [1, 2, 3],
        "eta": 2,
        "storage_path": str(tmp_path / "runs"),
    }
    return SweepConfig.from_dict({**raw, **over})


def _point(encoder: str, decoder: str, lr: float, accumulation: int) -> dict[str, Any]:
    return {"encoder": encoder, "decoder": decoder, "lr": lr, "accumulation": accumulation}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"grid": {"encoders": ["resnet344"]}}, r"Wrong encoder name `resnet344`, supported encoders: \[resnet34,"),
        ({"grid": {"decoders": ["Unett"]}}, r"Wrong decoder `Unett`"),
        ({"grid": {"lrs": [0.0]}}, r"`grid.lrs` is not valid: learning rates must be > 0"),
        ({"grid": {"accumulation": [0]}}, r"`grid.accumulation` is not valid: steps must be >= 1"),
        ({"rungs": [4, 2]}, "strictly increasing"),
        ({"eta": 1}, "`eta >= 2`"),
        ({"cache": "/nonexistent"}, "is not a training cache"),
        ({"cpus_per_trial": 0}, "resources per trial"),
        ({"gridd": {}}, r"unknown key\(s\) \['gridd'\]"),
        ({"search": "tpe"}, r"`search` is 'tpe', but must be 'grid', 'guided' or 'optuna'"),
        ({"fold_runs": {"top": 2}}, r"unknown key\(s\) \['top'\] in `fold_runs`"),
        ({"fold_runs": {"top_k": 0}}, r"`fold_runs.top_k` is 0, but must be an integer >= 1"),
        ({"fold_runs": {"folds": [0, 1]}}, r"but \[0\] are not folds to run: the cache has folds \[0, 1, 2, 3\]"),
        ({"fold_runs": {"folds": [7]}}, r"but \[7\] are not folds to run"),
        ({"fold_runs": {"folds": [1, 1]}}, r"must be a non-empty list of distinct folds"),
        ({"search": "guided", "pending_trials": 0}, r"`pending_trials` is 0, but must be an integer >= 1"),
        ({"preempt_fold_runs": "yes"}, r"`preempt_fold_runs` is 'yes', but must be true or false"),
        ({"search": "optuna", "lr_range": [1e-3, 1e-5]}, r"`lr_range` is \[0.001, 1e-05\], but must be \[low, high\]"),
        ({"lr_range": [1e-5, 1e-3]}, r"`lr_range` is for `search: optuna`"),
    ],
)
def test_bad_sweep_configs_fail_fast(cache: Path, tmp_path: Path, over: dict[str, Any], message: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        _cfg(cache, tmp_path, **over).validate()
    assert time.perf_counter() - start < 5.0


def test_trials_get_an_absolute_cache_path(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials run in their own directories: a relative cache path in the config must reach them absolute."""
    monkeypatch.chdir(cache.parent)
    cfg = _cfg(Path(cache.name), tmp_path)
    assert cfg.validate() == []
    assert all(c["cache"] == str(cache.resolve()) for c in cfg.trial_configs())


def test_the_seed_grid_resolves() -> None:
    cfg = SweepConfig.from_yaml(ROOT / "sweeps" / "configs" / "screen-t4.yaml")
    g = cfg.grid
    assert len(g.encoders) * len(g.decoders) * len(g.lrs) * len(g.accumulation) == 720
    for d in g.decoders:
        resolve_decoder(d)
    for e in g.encoders:
        resolve_model(ModelConfig(encoder=e, weights=g.weights.get(e)))
    configs = [c for c in cfg.trial_configs() if c["model"]["encoder"] == "resnext50_32x4d"]
    assert configs[0]["model"]["weights"] == "swsl" and configs[0]["batch_size"] == 4
    assert configs[0]["epochs"] == 200 and {c["accumulation"] for c in configs} == {1, 4, 16}


def test_named_axes_multiply_the_grid_with_per_encoder_values(cache: Path, tmp_path: Path) -> None:
    """A named axis sets its dotted training key in every trial; a per-encoder axis gives each encoder its own
    values (``default`` for those not named); every combination is one trial, and the table shows each axis."""
    from geopose_ray.sweep.table import result_row, rows_csv, trial_params

    grid = {
        "encoders": ["tu-test_resnet", "resnet18"],
        "lrs": ["1e-3"],  # as YAML 1.1 reads 1e-3: a string, taken as the number it is
        "axes": {
            "batch_size": {"resnet18": [2, 3], "default": [4]},
            "loss.kind": ["mse", "r2_huber"],
            "augment.photometric.p": [0.0, 0.8],  # a level that is None in `train` (augment: None) is made
        },
    }
    cfg = _cfg(cache, tmp_path, grid=grid)
    assert cfg.validate() == []
    configs = cfg.trial_configs()
    assert cfg.n_trials == len(configs) == (1 + 2) * 2 * 2
    seen = [
        (c["model"]["encoder"], c["batch_size"], c["loss"]["kind"], c["augment"]["photometric"]["p"]) for c in configs
    ]
    assert len(set(seen)) == len(seen) and set(seen) == {
        (e, batch, kind, p)
        for e, batches in (("tu-test_resnet", [4]), ("resnet18", [2, 3]))
        for batch in batches
        for kind in ("mse", "r2_huber")
        for p in (0.0, 0.8)
    }
    assert all(c["lr"] == 1e-3 and c["augment"]["rot90"] is True for c in configs)  # the rest at its defaults
    rows = [result_row(f"t{i}", "screen", "paused", 1, c, {}, cfg.axes) for i, c in enumerate(configs)]
    header = rows_csv(rows).splitlines()[0]
    assert header.split(",")[12:14] == ["loss.kind", "augment.photometric.p"]  # batch_size is a fixed column
    params = trial_params(configs[-1], cfg.axes)
    assert (params["batch_size"], params["loss.kind"], params["augment.photometric.p"]) == ("3", "r2_huber", "0.8")


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"lr": [1e-3]}, r"`grid.axes.lr` cannot be an axis: the sweep sets it from `grid.lrs`"),
        ({"model.encoder": ["resnet18"]}, r"from `grid.encoders`"),
        ({"epochs": [3]}, r"from `rungs`"),
        ({"crop": []}, r"`grid.axes.crop` is \[\]: give a non-empty list"),
        ({"crop": [16]}, r"the grid point with crop=16 \(tu-test_resnet\): The value of `crop` is 16"),
        ({"crop": {"resnet50": [32]}}, r"names \['resnet50'\], which are not in `grid.encoders`"),
        ({"crop": {"tu-test_resnet": [32]}}, r"gives no values for \['resnet18'\]"),
        ({"loss.kindd": ["mse"]}, r"the grid point with loss.kindd=mse \(tu-test_resnet\): unknown key"),
        ({"loss.kind": ["msee"]}, r"the grid point with loss.kind=msee"),
        ({"crop": [4096]}, r"The value of `crop` is 4096, but the cache's tiles are"),
        ({"bad key": [1]}, r"is not a dotted training key"),
        ({"model": [{}]}, r"`grid.axes.model` would replace `model.encoder`, which the sweep sets"),
        ({"loss": [{}], "loss.kind": ["mse"]}, r"`grid.axes.loss` and `grid.axes.loss.kind` set the same key"),
        ({"crop": 32}, r"`grid.axes.crop` is 32: give a non-empty list"),
    ],
)
def test_bad_named_axes_fail_before_ray_starts(cache: Path, tmp_path: Path, axes: dict[str, Any], message: str) -> None:
    cfg = _cfg(cache, tmp_path, grid={"encoders": ["tu-test_resnet", "resnet18"], "axes": axes})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_optuna_draws_an_index_into_each_named_axis_so_every_encoder_needs_as_many_values(
    cache: Path, tmp_path: Path
) -> None:
    axes = {"crop": {"tu-test_resnet": [32], "resnet18": [32, 48]}}
    cfg = _cfg(cache, tmp_path, search="optuna", grid={"encoders": ["tu-test_resnet", "resnet18"], "axes": axes})
    with pytest.raises(ConfigError, match=r"`grid.axes.crop` gives the encoders different numbers of values"):
        cfg.validate()


def _epochs(trial_dir: Path) -> list[int]:
    return [int(json.loads(line)["epoch"]) for line in (trial_dir / "result.json").read_text().splitlines()]


def test_screening_pauses_resumes_and_runs_finalist_folds(
    ray_cluster: None, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geopose_ray.cluster.driver import run_sweep

    cfg = _cfg(cache, tmp_path)
    result = run_sweep(cfg)
    screen = [r for r in result.rows if r["stage"] == "screen"]
    assert len(screen) == 6
    assert result.finalists and all(r["epoch"] == 3 for r in screen if r["status"] == "finalist")
    assert any(r["status"] == "paused" and r["epoch"] < 3 for r in screen)  # the promoter held some back
    # score_avg reaches the table; at 3 epochs its window (5 % of them) is the last epoch alone.
    assert all(r["score_avg"] == pytest.approx(r["score"]) for r in screen)
    # Paused trials resumed from their checkpoints: every trial's epochs are 1, 2, ... with none repeated.
    for r in screen:
        epochs = _epochs(tmp_path / "runs" / "t-screen" / r["trial"])
        assert epochs == list(range(1, len(epochs) + 1)), (r["trial"], epochs)
    folds = [r for r in result.rows if r["stage"] == "fold"]
    assert len(folds) == 3 * len(result.finalists)  # the cache has 4 folds; fold 0 was screened
    assert {r["val_fold"] for r in folds} == {1, 2, 3}
    # Each finalist's cross-validated score: the mean of its own and its three fold runs' score_avg.
    by_trial = {r["trial"]: r for r in result.rows}
    for t in result.finalists:
        own = [by_trial[t]["score_avg"]] + [by_trial[f"{t}/fold{k}"]["score_avg"] for k in (1, 2, 3)]
        assert by_trial[t]["cv_folds"] == 4 and by_trial[t]["cv_score"] == pytest.approx(sum(own) / 4)
    assert result.table_path.read_text().startswith("trial,stage,status,rung,encoder,decoder,weights,lr,accumulation")
    # MLflow: one parent run, one child run per trial and per fold run, statuses as the promoter left them.
    from geopose_ray.tracking import Tracker

    tracker = Tracker(cfg.mlflow_uri, "t", "t")
    runs = {r.data.tags["trial"]: r for r in tracker.runs()}
    assert set(runs) == {r["trial"] for r in result.rows}
    parent = tracker.parent().id
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs.values())
    for row in screen:
        run = runs[row["trial"]]
        assert run.data.tags["status"] == row["status"]
        assert run.data.params["lr"] == str(row["lr"]) and run.data.params["effective_batch"] == str(
            row["effective_batch"]
        )
        steps = [m.step for m in tracker._client.get_metric_history(run.info.run_id, "score")]
        assert steps == list(range(1, row["epoch"] + 1))  # every epoch once, none twice
    assert {runs[r["trial"]].data.tags["stage"] for r in folds} == {"fold"}
    # Learning curves as artifacts: one per finished trial, all screening curves on the parent.
    finalist_run = runs[result.finalists[0]].info.run_id
    assert "learning_curve.png" in {a.path for a in tracker._client.list_artifacts(finalist_run)}
    assert {"results.csv", "screen_curves.png"} <= {a.path for a in tracker._client.list_artifacts(parent)}
    # `geopose-ray results` prints the same table from MLflow.
    import yaml

    from geopose_ray.cli import main

    y = tmp_path / "sweep.yaml"
    y.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert main(["results", "--config", str(y)]) == 0
    printed = capsys.readouterr().out
    assert all(r["trial"][:20] in printed for r in result.rows) and "finalist" in printed
    # MLflow's table ranks the finalists as the driver's did, by the same means over folds.
    from geopose_ray.tracking import results_table

    from_mlflow = [(r["trial"], r["cv_score"]) for r in results_table(tracker) if r["trial"] in result.finalists]
    in_driver = [(r["trial"], r["cv_score"]) for r in result.rows if r["trial"] in result.finalists]
    assert [t for t, _ in from_mlflow] == [t for t, _ in in_driver]
    assert [v for _, v in from_mlflow] == pytest.approx([v for _, v in in_driver])


@pytest.mark.slow
def test_a_spent_budget_stops_promotion_and_a_reopened_sweep_goes_on_from_checkpoints(
    ray_cluster: None, cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU-hour budget spent by the first results is a cap: the two trials running (one per worker) pause at
    rung 1 and the other two never start. promote.py's reopening with a larger budget promotes the qualifying
    one, which continues from its checkpoint, and starts the two never started; the finalists get their fold
    runs; adding a rung sends the best finalist on, fold runs included. No epoch is trained twice and every
    trial keeps one MLflow run."""
    from geopose_ray.cluster.driver import reopen_sweep, run_sweep
    from geopose_ray.tracking import Tracker

    grid = {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3, 3e-3], "accumulation": [1, 2]}
    cfg = _cfg(cache, tmp_path, grid=grid, rungs=[1, 2], eta=2, gpus_per_trial=1, budget_gpu_hours=1e-9)
    with caplog.at_level(logging.WARNING, logger="geopose_ray"):
        first = run_sweep(cfg)
    assert first.finalists == [] and len(first.rows) == 4  # no promotion, so no fold runs either
    # The user is told when the budget ran out, and at the end which paused trials it held back (the top 1/η).
    assert "budget_gpu_hours 1e-09 is spent" in caplog.text
    assert len(first.held_back) == 1 and "held back by the spent budget: 1 paused trial(s)" in first.report()
    assert "sweeps/promote.py --config" in caplog.text
    ran = [r for r in first.rows if r["epoch"]]
    assert len(ran) == 2 and all(r["status"] == "paused" and r["epoch"] == 1 and r["rung"] == 1 for r in ran)
    never = [r for r in first.rows if not r["epoch"]]
    assert len(never) == 2 and all(r["status"] == "stopped" and r["gpu_hours"] == 0 for r in never)
    saved = json.loads((tmp_path / "runs" / "t" / "promoter.json").read_text())["promoter"]
    for r in ran:  # a trial holding 1 GPU spends 1 GPU-hour per hour of its epochs
        assert r["gpu_hours"] > 0 and saved["gpu_hours"][r["trial"]] == pytest.approx(r["device_hours"])

    second = reopen_sweep(cfg, budget_gpu_hours=10.0)
    assert second.held_back == [] and "held back" not in second.report()
    by_key = {r["trial"]: r for r in second.rows}
    # The top 1/η of the rung's results as each arrives (asynchronous halving: 2 of the 4, or 3 when one arrived
    # early in the top half of fewer).
    assert 2 <= len(second.finalists) <= 3
    for t in second.finalists:
        assert by_key[t]["epoch"] == 2 and by_key[t]["status"] == "finalist"
        # Epoch 1 was not trained again by a trial that had run; one started now trains both.
        assert _epochs(tmp_path / "runs" / "t-screen-1" / t) == ([2] if t in first.held_back else [1, 2])
    assert {r["trial"] for r in never} <= {r["trial"] for r in second.rows if r["epoch"] >= 1}  # they ran now
    folds = [r for r in second.rows if r["stage"] == "fold"]
    assert sorted(r["trial"] for r in folds) == sorted(f"{t}/fold{k}" for t in second.finalists for k in (1, 2, 3))

    third = reopen_sweep(cfg, add_rung=3)
    assert len(third.finalists) == 1 and third.finalists[0] in second.finalists
    best = third.finalists[0]
    assert _epochs(tmp_path / "runs" / "t-screen-2" / best) == [3]
    fold_dirs = sorted((tmp_path / "runs" / "t-folds-2").glob("*/result.json"))
    assert len(fold_dirs) == 3 and all(_epochs(d.parent) == [3] for d in fold_dirs)  # fold runs continued
    rows = {r["trial"]: r for r in third.rows}
    assert rows[best]["epoch"] == 3 and rows[f"{best}/fold1"]["epoch"] == 3
    for other in set(second.finalists) - {best}:
        assert rows[other]["status"] == "paused" and rows[other]["epoch"] == 2

    tracker = Tracker(cfg.mlflow_uri, "t", "t")
    runs = tracker.runs()
    assert sorted(r.data.tags["trial"] for r in runs) == sorted(rows)  # one run per trial, none duplicated
    run = next(r for r in runs if r.data.tags["trial"] == best)
    steps = [m.step for m in tracker._client.get_metric_history(run.info.run_id, "score")]
    assert steps == [1, 2, 3] and run.data.tags["status"] == "finalist"


@pytest.mark.slow
def test_a_sweep_on_an_object_store_records_uris_reopens_from_them_and_ensembles_them(
    ray_cluster: None, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: str
) -> None:
    """storage_path on an object store (a local S3-compatible server): Tune writes every checkpoint there, the
    sweep records each as a URI any node can open and keeps its own files beside them, so that a driver in
    another directory (a new head, or a job with another working dir) resumes it, reopens it and finds its
    ensemble's members; a reopened sweep continues its paused trials from the checkpoints without training an
    epoch twice."""
    import pyarrow.fs

    from geopose_ray.cluster.driver import load_records, reopen_sweep, run_sweep
    from geopose_ray.engine.checkpoint import load_checkpoint
    from geopose_ray.ensemble.members import check_members, find_members
    from geopose_ray.storage import join, stat

    heads = [tmp_path / f"head{i}" for i in range(3)]  # the drivers' working directories: each a new head
    for head in heads:
        head.mkdir()
    monkeypatch.chdir(heads[0])  # working copies of the sweep's own files go under runs/ here
    monkeypatch.setenv("GEOPOSE_RAY_STORAGE_CACHE", str(tmp_path / "fetched"))
    storage = join(s3, "e2e")
    query = storage.partition("?")[2]
    # Two trials, one per worker: both start before the budget is spent, then pause at rung 1 (a cap: a third
    # would never have started).
    grid = {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3, 3e-3], "accumulation": [1]}
    cfg = _cfg(cache, tmp_path, grid=grid, rungs=[1, 2], eta=2, gpus_per_trial=1, budget_gpu_hours=1e-9)
    cfg = dataclasses.replace(cfg, storage_path=storage)
    (note,) = [n for n in cfg.validate() if "credentials" in n]  # said once, without the secret
    assert note.startswith(f"storage_path s3://***@bucket/sweeps/e2e?{query} carries credentials")
    first = run_sweep(cfg)
    assert first.finalists == [] and len(first.checkpoints) == 2
    for t, location in first.checkpoints.items():
        assert location.startswith(f"s3://key:secret@bucket/sweeps/e2e/t-screen/{t}/checkpoint_")
        assert location.endswith(f"?{query}") and stat(join(location, "last.pt")) is not None
    assert not list(tmp_path.rglob("bucket"))  # nothing written to a local path named after the bucket
    for name in ("trials.json", "promoter.json", "results.csv"):  # the sweep's own files, on the bucket
        assert stat(join(join(storage, "t"), name)) is not None
    from geopose_ray.tracking import Tracker

    tracker = Tracker(cfg.mlflow_uri, "t", "t")  # the sweep's own files: runs/t/ in the driver's directory
    params = tracker._client.get_run(tracker.parent().id).data.params
    assert params["storage_path"] == f"s3://***@bucket/sweeps/e2e?{query}"  # no credentials in MLflow

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)

    def epochs(experiment: str, trial: str) -> list[int]:  # a trial's result.json on the bucket
        with fs.open_input_stream(f"{root}/{experiment}/{trial}/result.json") as f:
            return [int(json.loads(line)["epoch"]) for line in f.read().decode().splitlines()]

    # A driver restarted with --resume on another head finds the experiment on the bucket (Tune restores it from
    # the URI) and the promoter's state beside it.
    shutil.rmtree(heads[0] / "runs")  # the first head is gone, with its working copies
    monkeypatch.chdir(heads[1])
    again = run_sweep(cfg, resume=True)
    assert again.checkpoints == first.checkpoints and again.finalists == []
    assert not (heads[0] / "runs").exists()  # the restored scheduler and callback write to this head's files
    assert all(epochs("t-screen", t) == [1] for t in first.checkpoints)  # nothing trained again

    monkeypatch.chdir(heads[2])
    second = reopen_sweep(cfg, budget_gpu_hours=10.0)
    assert len(second.finalists) == 1  # the top 1/η of the 2 at rung 1
    for t in second.finalists:  # continued from the checkpoint on the bucket: epoch 1 was not trained again
        assert epochs("t-screen-1", t) == [2]
    assert sorted(k for k in second.checkpoints if "/fold" in k) == sorted(
        f"{t}/fold{k}" for t in second.finalists for k in (1, 2, 3)
    )
    # The head that resumed keeps stale working copies; the bucket's files, which the reopening changed, rule.
    monkeypatch.chdir(heads[1])
    saved, promoter = load_records(cfg)
    assert saved.round == 1 and saved.finalists == promoter.finalists == second.finalists
    members = find_members(cfg.files.home)
    assert sorted(m.name for m in members) == sorted(second.finalists)
    assert all(f.checkpoint.startswith("s3://key:secret@bucket/sweeps/e2e/") for m in members for f in m.folds)
    assert check_members(members, downsample=2) == {}  # remote: left to the workers, not downloaded to the head
    assert not list((tmp_path / "fetched").rglob("*.pt"))
    assert all(load_checkpoint(f.checkpoint)["downsample"] == 2 for m in members for f in m.folds)
    assert len(list((tmp_path / "fetched").rglob("*.pt"))) == 4  # every fold model fetched once and loaded


@pytest.mark.slow
def test_optuna_tpe_draws_trials_from_ranges_under_the_promoter(ray_cluster: None, cache: Path, tmp_path: Path) -> None:
    """search: optuna draws num_samples trials (a log-uniform learning rate from lr_range, a named axis's value by
    index), the promoter pauses and promotes them as in a grid sweep, and finalists get their fold runs."""
    import torch

    from geopose_ray.cluster.driver import run_sweep
    from geopose_ray.tracking import Tracker, results_table

    grid = {"encoders": ["tu-test_resnet"], "accumulation": [1, 2], "axes": {"loss.kind": ["mse", "huber"]}}
    # Fold runs for the best finalist only, on two of the three other folds.
    cfg = _cfg(cache, tmp_path, search="optuna", num_samples=4, lr_range=[1e-4, 1e-2], rungs=[1, 2], eta=2, grid=grid,
               fold_runs={"top_k": 1, "folds": [1, 3]})  # fmt: skip
    assert cfg.validate() == [] and cfg.n_trials == 4
    result = run_sweep(cfg)
    screen = [r for r in result.rows if r["stage"] == "screen"]
    assert len(screen) == 4
    # The drawn value is what the trial trained with (its checkpoint's config) and what the table and MLflow show.
    for r in screen:
        last = sorted((tmp_path / "runs" / "t-screen" / r["trial"]).glob("checkpoint_*/last.pt"))[-1]
        saved = torch.load(last, weights_only=True)
        assert r["loss.kind"] == saved["config"]["loss"]["kind"] in ("mse", "huber")
    mlflow_rows = {r["trial"]: r for r in results_table(Tracker.for_sweep(cfg))}
    assert all(mlflow_rows[r["trial"]]["loss.kind"] == r["loss.kind"] for r in screen)
    header = (tmp_path / "runs" / "t" / "results.csv").read_text().splitlines()[0].split(",")
    assert header.index("loss.kind") == header.index("val_fold") + 1
    # The sweep's curves, exported from MLflow (`geopose-ray curves export`), replay through every policy.
    from geopose_ray.simulate.recorded import read_curves, replay_table, write_curves
    from geopose_ray.tracking import sweep_curves

    curves, params = sweep_curves(Tracker.for_sweep(cfg))
    assert sorted(curves) == sorted(r["trial"] for r in screen)
    assert all([e for e, _, _ in curves[r["trial"]]] == list(range(1, r["epoch"] + 1)) for r in screen)
    assert all(h > 0 for points in curves.values() for _, _, h in points)  # each epoch's own hours
    assert all(params[r["trial"]]["loss.kind"] == r["loss.kind"] for r in screen)
    write_curves(tmp_path / "curves.csv", curves, params)
    table = read_curves(tmp_path / "curves.csv")
    assert table.params is not None and {p["loss.kind"] for p in table.params} <= {"mse", "huber"}
    replayed = replay_table(table, workers=2, seeds=2, rungs=[1, 2], eta=2, min_results=1)
    assert replayed["policies"]["grid"]["regret"] == [0.0, 0.0]
    lrs = [r["lr"] for r in screen]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 4  # drawn from the range, not a grid
    assert all(r["accumulation"] in (1, 2) and r["encoder"] == "tu-test_resnet" for r in screen)
    assert result.finalists and {r["status"] for r in screen} <= {"finalist", "paused", "stopped"}
    finals = {r["trial"]: r["score"] for r in screen if r["status"] == "finalist"}
    best = max(finals, key=lambda t: finals[t])
    assert sorted(r["trial"] for r in result.rows if r["stage"] == "fold") == [f"{best}/fold1", f"{best}/fold3"]
    for r in screen:  # paused trials resumed from checkpoints here too
        epochs = _epochs(tmp_path / "runs" / "t-screen" / r["trial"])
        assert epochs == list(range(1, len(epochs) + 1))


@pytest.mark.slow
def test_guided_search_starts_every_grid_point_once_and_learns_from_the_first_rung(
    ray_cluster: None, cache: Path, tmp_path: Path
) -> None:
    """search: guided runs the whole grid, each point once, under the promoter; its searcher (saved with the
    experiment by Tune) holds each trial's first-rung score, the same the promoter ranked it by. The finalists'
    fold runs are backfilled: trials of the screening experiment itself, with no fold stage after it."""
    import pickle

    from geopose_ray.cluster.driver import run_sweep
    from geopose_ray.sweep.promoter import Promoter

    # One screening trial's epochs take 6 s more: the other worker finishes the rest of the grid meanwhile, and
    # then has nothing but fold runs to do.
    slow = {"slow": {"lr": 1e-2, "accumulation": 1, "seconds": 6}}
    cfg = _cfg(cache, tmp_path, search="guided", rungs=[1, 2], eta=2, pending_trials=2, faults=slow)
    result = run_sweep(cfg)
    screen = [r for r in result.rows if r["stage"] == "screen"]
    assert sorted((r["lr"], r["accumulation"]) for r in screen) == sorted(
        (lr, k) for lr in (1e-3, 3e-3, 1e-2) for k in (1, 2)
    )
    assert result.finalists and {r["status"] for r in screen} <= {"finalist", "paused", "stopped"}
    folds = [r for r in result.rows if r["stage"] == "fold"]
    assert sorted(r["trial"] for r in folds) == sorted(f"{t}/fold{k}" for t in result.finalists for k in (1, 2, 3))
    assert all(r["status"] == "done" and r["epoch"] == 2 for r in folds)
    assert not (tmp_path / "runs" / "t-folds").exists()
    assert all((tmp_path / "runs" / "t-screen" / r["trial"].replace("/", "-")).is_dir() for r in folds)
    # Backfilled: the first fold run started before screening's last epoch ended (Tune's own result times).
    times = {
        d.name: [json.loads(line)["timestamp"] for line in (d / "result.json").read_text().splitlines()]
        for d in (tmp_path / "runs" / "t-screen").iterdir()
        if (d / "result.json").is_file()
    }
    first_fold = min(t[0] for name, t in times.items() if "-fold" in name)
    assert first_fold < max(t[-1] for name, t in times.items() if "-fold" not in name)
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ  # set for the screening Tuner only
    [saved] = (tmp_path / "runs" / "t-screen").glob("searcher-state-*.pkl")
    searcher = pickle.loads(saved.read_bytes())
    promoter = Promoter.from_dict(json.loads((tmp_path / "runs" / "t" / "promoter.json").read_text())["promoter"])
    first = {trial: searcher["order"].scores[i] for trial, i in searcher["index"].items()}
    assert len(first) == 6 and first == pytest.approx(promoter.results[0])
    assert searcher["queue"] == [] and searcher["ended"] == set(first)


class _FoldRunsArriving:
    """A Ray Tune searcher handing out two fold runs of a cheap finalist, then, once both have reported an epoch,
    one of a finalist whose architecture took three times as long an epoch when screened: as ``search: guided``
    hands out a costly finalist's runs when it reaches the top rung while cheaper ones hold the workers. Every
    result it is told of is appended to ``log`` (one JSON line: run, epoch), in the order Tune processed them."""

    @staticmethod
    def make(cheap: list[dict[str, Any]], costly: dict[str, Any], log: Path) -> Any:
        from ray.tune.search import Searcher

        class Arriving(Searcher):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__(metric="score", mode="max")
                self.todo, self.costly, self.names = list(cheap), dict(costly), {}

            def suggest(self, trial_id: str) -> dict[str, Any] | None:
                if self.todo:
                    cfg = self.todo.pop(0)
                elif self.costly and log.is_file() and len({run for run, _ in map(json.loads, log.open())}) == 2:
                    cfg, self.costly = self.costly, {}
                else:
                    return None if self.costly else Searcher.FINISHED  # type: ignore[return-value]
                self.names[trial_id] = f"{cfg['_finalist']}/fold{cfg['val_fold']}"
                return {"cfg": cfg}

            def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
                with log.open("a") as f:
                    f.write(json.dumps([self.names[trial_id], int(result["epoch"])]) + "\n")

            def on_trial_complete(self, trial_id: str, result: Any = None, error: bool = False) -> None:
                pass

        return Arriving()


@pytest.mark.slow
@pytest.mark.parametrize("preempt", [True, False])
def test_a_waiting_fold_run_of_a_costlier_architecture_pre_empts_a_cheaper_one(
    ray_cluster: None, cache: Path, tmp_path: Path, preempt: bool
) -> None:
    """Two workers run a cheap finalist's two fold runs (7 epochs each) when a run of an architecture three times
    as costly an epoch arrives: 21 epoch-units left against at most 6. With pre-emption one cheap run pauses at its
    epoch's end, the costly run starts on its worker, and the cheap one resumes from its checkpoint once a worker is
    free, no epoch trained twice; without, the costly run waits for a cheap run to end."""
    from ray import tune

    from geopose_ray.cluster.scheduler import PromoterScheduler
    from geopose_ray.cluster.trainable import train_trial
    from geopose_ray.sweep.promoter import Promoter

    sweep = _cfg(cache, tmp_path)
    # Every epoch 3 s longer, so that both cheap runs still run when the costly one arrives (the second worker
    # process starts several seconds after the first).
    top = 7
    slow = {"slow": {"lr": 1e-3, "accumulation": 1, "seconds": 3, "folds": True}}
    private = {"_threads": 1, "_gpus": 0.0, "_faults": slow, "epochs": top}
    cheap_point = _point("tu-test_resnet", "Unet", 1e-3, 1)
    cheap = [
        {**sweep.trial_config(cheap_point), **private, "val_fold": k, "_finalist": "cheap", "_epoch_hours": 0.01}
        for k in (1, 2)
    ]  # fmt: skip
    costly = {**sweep.trial_config(_point("tu-test_resnet", "FPN", 1e-3, 1)), **private, "val_fold": 1,
              "_finalist": "costly", "_epoch_hours": 0.03}  # fmt: skip
    log = tmp_path / "results.jsonl"
    tuner = tune.Tuner(
        tune.with_resources(train_trial, {"cpu": 1}),
        tune_config=tune.TuneConfig(
            # A waiting run pre-empts at once here; on a cluster only after PREEMPT_AFTER_S (a node's start).
            scheduler=PromoterScheduler(Promoter(rungs=[top], eta=2), preempt_folds=preempt, preempt_after_s=0),
            search_alg=_FoldRunsArriving.make(cheap, costly, log),
            num_samples=-1,
            metric="score",
            mode="max",
            trial_dirname_creator=lambda t: t.trial_id,
            reuse_actors=True,
            time_budget_s=600,  # a paused run that never resumes ends the run, and the test fails, not hangs
        ),
        run_config=tune.RunConfig(
            name="folds",
            storage_path=str(tmp_path / "runs"),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    assert not grid.errors
    for r in grid:
        assert epochs_once(Path(r.path)) == list(range(1, top + 1))  # every epoch once: a pause loses none
    order = [tuple(x) for x in map(json.loads, log.read_text().splitlines())]
    first_costly = order.index(("costly/fold1", 1))
    ends = [order.index((f"cheap/fold{k}", top)) for k in (1, 2)]
    if preempt:
        # The costly run started while both cheap runs had epochs left; one of them trained none meanwhile.
        # The costly run started while both cheap runs had epochs left; the one to end last had yielded its
        # worker: it trained no epoch from then until the other ended, and then went on from where it was.
        assert first_costly < min(ends)
        late = f"cheap/fold{1 + ends.index(max(ends))}"
        before = [e for run, e in order[:first_costly] if run == late]
        assert before and max(before) < top
        assert not any(run == late for run, _ in order[first_costly : min(ends)])
    else:
        assert first_costly > min(ends)


def test_a_fold_run_paused_for_a_costlier_one_shows_as_paused_until_it_reports_again(tmp_path: Path) -> None:
    """The results table and the run's MLflow tag (real MLflow on SQLite) say "paused" at once for a fold run Tune
    paused (the scheduler's pre-emption), and results.csv too once the refresh interval since its last write has
    passed (not dropped); "running" once it reports again, "done" when it ends. A waiting run that never reported
    gets no row."""
    from ray.tune.experiment import Trial

    from geopose_ray.cluster.callback import MlflowCallback
    from geopose_ray.sweep.files import SweepFiles
    from geopose_ray.sweep.table import SweepTable
    from geopose_ray.tracking import Tracker

    def fold(name: str, status: str) -> Trial:
        cfg = {"model": {"encoder": "e", "decoder": "Unet"}, "epochs": 10, "val_fold": 1, "_finalist": name}
        t = Trial("train_trial", config={"cfg": cfg}, trial_id=name, stub=True)
        t.set_status(status)
        return t

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", "t", artifact_dir=str(tmp_path / "artifacts"))
    table = SweepTable(SweepFiles(str(tmp_path), tmp_path), [10], refresh_s=30.0)
    callback = MlflowCallback(tracker, None, "fold", table)
    ran, waits = fold("a", Trial.RUNNING), fold("b", Trial.PENDING)

    def status() -> tuple[str, str, str]:
        [run] = tracker.runs()
        csv = (tmp_path / "results.csv").read_text().splitlines()
        return table.rows["a/fold1"]["status"], csv[1].split(",")[2], run.data.tags["status"]

    callback.on_trial_result(0, [ran, waits], ran, {"epoch": 2, "score": 0.5})
    callback.on_step_end(1, [ran, waits])
    assert table.rows["a/fold1"]["status"] == "running" and set(table.rows) == {"a/fold1"}
    ran.set_status(Trial.PAUSED)
    table._written = time.monotonic()  # the table was written a moment ago: the pause waits for refresh_s
    callback.on_step_end(2, [ran, waits])
    assert status() == ("paused", "running", "paused")
    callback.on_step_end(3, [ran, waits])
    assert status() == ("paused", "running", "paused")
    table._written -= 30.0  # refresh_s has passed: the next step of Tune's loop writes it
    callback.on_step_end(4, [ran, waits])
    assert status() == ("paused", "paused", "paused") and set(table.rows) == {"a/fold1"}
    ran.set_status(Trial.RUNNING)
    table._written -= 30.0
    callback.on_trial_result(5, [ran, waits], ran, {"epoch": 3, "score": 0.6})
    callback.on_step_end(6, [ran, waits])
    assert status() == ("running", "running", "running")
    table._written -= 30.0
    callback.on_trial_complete(7, [ran, waits], ran)
    assert status() == ("done", "done", "done")


def test_a_trial_whose_results_tune_lost_is_recorded_from_its_checkpoints(tmp_path: Path) -> None:
    """A driver SIGKILLed after a trial's first checkpoints were persisted but before Tune's own files caught up
    (result.json empty, no checkpoint registered), then restored: the trial's Result has neither metrics (nor so
    its config) nor a checkpoint. It is recorded from what it reported with its latest complete checkpoint on
    storage and the config Tune wrote at its start, not dropped from the table; one that never reported is
    still skipped."""
    from ray import tune

    from geopose_ray.cluster.driver import _records

    cfg = {"model": {"encoder": "tu-test_resnet", "decoder": "Unet"}, "lr": 0.003, "accumulation": 2, "_threads": 1}
    lost, never, unknown = tmp_path / "t" / "c37147b8", tmp_path / "t" / "0e4b05d7", tmp_path / "t" / "3a9e7c21"
    for d in (lost, never, unknown):
        (d / "checkpoint_000000").mkdir(parents=True)
        (d / "result.json").write_text("")
        if d != unknown:  # its config never reached storage: what it trained is unknown, so it is not recorded
            (d / "params.json").write_text(json.dumps({"cfg": cfg}))
    (unknown / "checkpoint_000000" / "reported.json").write_text(json.dumps({"epoch": 1, "score": 0.5}))
    (unknown / "checkpoint_000000" / "last.pt").write_bytes(b"model")
    (lost / "checkpoint_000000" / "reported.json").write_text(json.dumps({"epoch": 1, "score": 0.61}))
    (lost / "checkpoint_000001").mkdir()
    (lost / "checkpoint_000001" / "reported.json").write_text(json.dumps({"epoch": 2, "score": 0.64}))
    for k in (0, 1):
        (lost / f"checkpoint_00000{k}" / "last.pt").write_bytes(b"model")
    (lost / "checkpoint_000002").mkdir()  # torn: persisted without its metrics
    (lost / "checkpoint_000003").mkdir()  # torn: its metrics, but no model
    (lost / "checkpoint_000003" / "reported.json").write_text(json.dumps({"epoch": 4, "score": 0.7}))
    results = [tune.Result(metrics={}, checkpoint=None, error=None, path=str(d)) for d in (lost, never, unknown)]
    # Only for a Tuner restored after a killed driver: a fresh one's leftovers are not its trials'.
    assert _records(results, str(tmp_path)) == {}
    records = _records(results, str(tmp_path), restored=True)
    assert list(records) == ["c37147b8"]
    rec = records["c37147b8"]
    assert rec.metrics == {"epoch": 2, "score": 0.64} and rec.cfg["lr"] == 0.003 and rec.cfg["accumulation"] == 2
    assert rec.stage == "screen" and rec.checkpoint == str(lost / "checkpoint_000001")


def test_a_worker_lost_before_tune_registers_its_checkpoint_costs_no_retrained_epoch(
    ray_cluster: None, cache: Path, tmp_path: Path
) -> None:
    """The worker dies right after the driver has processed its epoch-2 result and before Tune registers epoch 2's
    checkpoint (faults: kill_after_result, the window a pre-empted node can fall in). Tune restores epoch 1's
    checkpoint; the trial takes up epoch 2's from storage, reports it again unchanged (marked replayed, logged
    to MLflow once) and trains epoch 3 from it: no epoch is trained twice."""
    from mlflow.tracking import MlflowClient

    from geopose_ray.cluster.driver import run_sweep
    from geopose_ray.tracking import Tracker

    grid = {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3], "accumulation": [1]}
    cfg = _cfg(cache, tmp_path, grid=grid, rungs=[3], eta=2, faults={"kill_after_result": 2})
    result = run_sweep(cfg)
    [trial] = result.finalists
    trial_dir = tmp_path / "runs" / "t-screen" / trial
    assert any("error" in p.name for p in trial_dir.iterdir())  # Tune saw the worker die
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    assert sorted({int(r["epoch"]) for r in results}) == [1, 2, 3]
    trained = [int(r["epoch"]) for r in results if not r.get("replayed")]
    assert len(trained) == len(set(trained))
    # The restarted worker's first result is epoch 2 taken up from storage, not trained again.
    restarted = [r for r in results if r["pid"] != results[0]["pid"]]
    assert int(restarted[0]["epoch"]) == 2 and restarted[0]["replayed"] == 1.0
    # MLflow got epoch 2 from the lost worker, before the kill; the replay carries the same metrics and is not
    # logged again (a retrained epoch 2 would add a second, different train_s at step 2).
    [run] = [r for r in Tracker(cfg.mlflow_uri, "t", "t").runs() if r.data.tags["trial"] == trial]
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    for key in ("score", "train_s", "gpu_hours"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
        assert {m.step: m.value for m in history}[2] == pytest.approx(restarted[0][key], rel=1e-12), key
    assert [r["epoch"] for r in result.rows if r["stage"] == "fold"] == [3, 3, 3]


@pytest.mark.slow
def test_failing_trials_are_errored_with_their_reason_and_out_of_memory_is_retried_at_half_the_batch(
    ray_cluster: None, cache: Path, tmp_path: Path
) -> None:
    """A trial whose loss turns NaN is marked errored with its reason in MLflow and the sweep goes on; a trial out
    of memory (simulated: any batch above 2) is retried once at half the batch and twice the accumulation, the
    same effective batch, and recorded as such."""
    from geopose_ray.cluster.driver import run_sweep
    from geopose_ray.tracking import Tracker

    grid = {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3, 1e8], "accumulation": [1]}
    cfg = _cfg(cache, tmp_path, grid=grid, rungs=[1, 2], eta=2, faults={"oom_above_batch": 2})
    result = run_sweep(cfg)
    rows = {r["lr"]: r for r in result.rows if r["stage"] == "screen"}
    assert rows[1e8]["status"] == "errored" and rows[1e-3]["status"] == "finalist"
    tracker = Tracker(cfg.mlflow_uri, "t", "t")
    runs = {r.data.tags["trial"]: r for r in tracker.runs()}
    bad = runs[rows[1e8]["trial"]].data.tags
    assert bad["status"] == "errored" and "non-finite loss" in bad["error"]
    good = runs[rows[1e-3]["trial"]]
    assert good.data.tags["oom_retry"] == "out of memory: retried at batch 2 x 2"
    assert good.data.metrics["batch_size"] == 2 and good.data.metrics["accumulation"] == 2
    assert good.data.params["batch_size"] == "4" and good.data.params["effective_batch"] == "4"
    folds = [r for r in result.rows if r["stage"] == "fold"]
    assert len(folds) == 3 and all(r["status"] == "done" and r["epoch"] == 2 for r in folds)


def test_screen_script_validates_a_config(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "sweeps"))
    try:
        import screen
    finally:
        sys.path.pop(0)
    y = tmp_path / "s.yaml"
    y.write_text(
        f"name: s\ncache: {cache}\ngrid: {{encoders: [tu-test_resnet], lrs: [0.001, 0.01], accumulation: [1, 4]}}\n"
        "train: {batch_size: 4}\nrungs: [1, 2]\n"
    )
    assert screen.main(["--config", str(y), "--validate-only"]) == 0
    assert "s: 4 trials (grid), rungs [1, 2], eta 3" in capsys.readouterr().out
    y.write_text(f"name: s\ncache: {cache}\ngrid: {{encoders: [resnet-34]}}\n")
    assert screen.main(["--config", str(y), "--validate-only"]) == 2
    assert "Wrong encoder name `resnet-34`" in capsys.readouterr().err


def test_demo_sweep_config_matches_the_shipped_yaml(tmp_path: Path) -> None:
    """sweeps/configs/demo.yaml is what `make demo` runs (with its own paths)."""
    from geopose_ray.demo import demo_sweep

    shipped = SweepConfig.from_yaml(ROOT / "sweeps" / "configs" / "demo.yaml")
    built = demo_sweep(shipped.name, Path(shipped.cache), Path(shipped.storage_path))
    assert dataclasses.asdict(built) == dataclasses.asdict(shipped)


@pytest.mark.slow
def test_the_whole_demo_with_its_sweep(ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `make demo` runs (relative paths under runs/, as there): synthesize, validate, prepare, floor,
    sweep, predict with the best finalist."""
    from geopose_ray.demo import run_demo

    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    report = run_demo("d", "runs", tiles=24, size=64, workers=2, log=lines.append)
    root = tmp_path / "runs" / "d"
    assert (root / "sweeps" / "d" / "results.csv").exists() and (root / "sweeps" / "d" / "mlflow.db").exists()
    assert (root / "submission").is_dir() and (root / "submission-means").is_dir()
    assert math.isfinite(report.score)
    assert any(line.startswith("floor (training means): score") for line in lines)
    # It ends with the ensemble of the finalists: its fit, the archive of the submission, the progression.
    fit = json.loads((root / "fit.json").read_text())
    assert abs(sum(fit["weights"].values()) - 1) < 1e-9 and fit["progression"][0][0].startswith("best single model")
    assert (root / "submission.tar.gz").stat().st_size > 0
    assert any("out of fold" in line for line in lines) and any("submission archive:" in line for line in lines)


def test_a_torn_tune_state_is_mended_from_the_killed_drivers_staging_copy_or_refused(
    ray_cluster: None, tmp_path: Path
) -> None:
    """A driver killed while Tune copies its state to the storage path leaves a torn file there. Restored as it
    is, Tune starts the experiment over with an empty config and its trials drop out of the results. The state is
    mended from the staging copy on this machine, and Tune then restores every trial with its results; with no
    staging copy here the resume is refused, naming the files, and nothing is changed."""
    from ray import tune

    from geopose_ray.cluster import tune_state
    from geopose_ray.errors import DataError

    def trainable(config: dict[str, Any]) -> None:
        for epoch in (1, 2):
            tune.report({"score": config["cfg"]["a"] * epoch, "epoch": epoch})

    name = f"torn-{os.getpid()}-{time.time_ns()}"
    grid = {"cfg": tune.grid_search([{"a": 1}, {"a": 2}, {"a": 3}])}
    first = tune.Tuner(trainable, param_space=grid, run_config=tune.RunConfig(name=name, storage_path=str(tmp_path)))
    trial_ids = sorted(r.metrics["trial_id"] for r in first.fit())
    experiment = tmp_path / name
    assert tune_state.mend(experiment) == []  # whole: nothing to do
    kept = {p.name: p.read_bytes() for p in tune_state.newest(experiment)}
    searcher = next(experiment.glob("basic-variant-state-*.json"))
    state = next(experiment.glob("experiment_state-*.json"))
    searcher.write_bytes(b"")
    state.write_bytes(kept[state.name][: len(kept[state.name]) // 2])
    assert not tune_state.intact(searcher) and not tune_state.intact(state)
    with pytest.raises(DataError, match=f"torn \\({state.name}, {searcher.name}|torn \\({searcher.name}, {state.name}"):
        tune_state.mend(experiment, roots=[tmp_path / "another-head"])
    assert searcher.read_bytes() == b""  # refused: nothing changed

    assert {searcher.name, state.name} <= set(tune_state.mend(experiment))
    assert {p.name: p.read_bytes() for p in tune_state.newest(experiment)} == kept
    results = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True).fit()
    assert not results.errors
    assert sorted((r.config["cfg"]["a"], r.metrics["score"]) for r in results) == [(1, 2), (2, 4), (3, 6)]
    assert sorted(r.metrics["trial_id"] for r in results) == trial_ids  # restored, not started over


@pytest.mark.slow
@pytest.mark.parametrize("search", ["grid", "guided"])
def test_a_killed_driver_resumes_without_retraining_or_duplicate_runs(cache: Path, tmp_path: Path, search: str) -> None:
    """SIGKILL `sweeps/screen.py` mid-sweep, rerun it with --resume: the sweep finishes, every trial's epochs
    are 1, 2, ... with none trained twice, the promoter's state is kept, and MLflow has one run per trial. With
    the guided order, the restored searcher starts no grid point twice and the finalists get their fold runs."""
    import signal
    import subprocess

    import yaml

    cfg = _cfg(cache, tmp_path, search=search)
    y = tmp_path / "sweep.yaml"
    y.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    cmd = [sys.executable, str(ROOT / "sweeps" / "screen.py"), "--config", str(y)]
    screen_dir = tmp_path / "runs" / "t-screen"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = sum(
            len((d / "result.json").read_text().splitlines())
            for d in screen_dir.glob("*")
            if (d / "result.json").exists()
        )
        if done >= 5:  # several epochs reported, some trials paused at rung 1: kill the driver now
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "runs" / "t" / "promoter.json").exists()
    # A kill while Tune copied its state to the storage path leaves a torn file there: tear the searcher's state
    # as such a kill would; --resume mends it from the killed driver's staging copy on this machine.
    searcher = max(
        (p for pattern in ("basic-variant-state-*.json", "search_gen_state-*.json") for p in screen_dir.glob(pattern)),
        key=lambda p: p.name,
    )
    searcher.write_bytes(searcher.read_bytes()[:7])
    # The results table is refreshed while the sweep runs (at the first pause), not only at its end.
    partial = (tmp_path / "runs" / "t" / "results.csv").read_text().splitlines()
    assert len(partial) >= 2 and ",paused," in "\n".join(partial)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"Tune's saved state was torn ({searcher.name})" in resumed.stderr
    rows = list(__import__("csv").DictReader((tmp_path / "runs" / "t" / "results.csv").open()))
    screen = [r for r in rows if r["stage"] == "screen"]
    assert len(screen) == 6 and any(r["status"] == "finalist" for r in screen)
    assert len({(r["lr"], r["accumulation"]) for r in screen}) == 6
    finalists = [r["trial"] for r in screen if r["status"] == "finalist"]
    folds = sorted(r["trial"] for r in rows if r["stage"] == "fold" and r["status"] == "done")
    assert folds == sorted(f"{t}/fold{k}" for t in finalists for k in (1, 2, 3))
    for r in screen:
        epochs = epochs_once(screen_dir / r["trial"])
        assert epochs == list(range(1, len(epochs) + 1)), (r["trial"], epochs)
    from geopose_ray.tracking import Tracker

    runs = Tracker(cfg.mlflow_uri, "t", "t").runs()
    keys = [run.data.tags["trial"] for run in runs]
    assert sorted(keys) == sorted(r["trial"] for r in rows)  # one run per trial, none duplicated

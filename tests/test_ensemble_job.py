"""The ensemble job's shell: members found in a sweep's trials.json, every bad input refused before inference,
and the whole job (OOF statistics, fit, test inference over Ray, submission, archive, score, MLflow) on a real
sweep's finalists."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from geopose_ray.engine.checkpoint import load_checkpoint, save_checkpoint
from geopose_ray.ensemble.members import FoldModel, Member, find_members
from geopose_ray.errors import DataError
from geopose_ray.sweep.config import SweepConfig


@pytest.fixture
def checkpoint(checkpoint_dir: Path) -> Path:
    """The session's real checkpoint directory (last.pt, best.pt) of a tiny model trained one epoch on the cache."""
    return checkpoint_dir


def _sweep(cache: Path, tmp_path: Path, checkpoint: Path, folds: list[int], finalists: list[str]) -> SweepConfig:
    """A finished sweep's files, written as the driver writes them, with every fold model at ``checkpoint``."""
    cfg = SweepConfig.from_dict({"name": "s", "cache": str(cache), "storage_path": str(tmp_path / "runs")})
    model = {"encoder": "tu-test_resnet", "decoder": "Unet"}
    base = {"model": model, "lr": 1e-3, "accumulation": 1, "batch_size": 4}
    trials: dict[str, Any] = {}
    for t in ("a", "b"):
        trials[t] = {"key": t, "stage": "screen", "cfg": {**base, "val_fold": folds[0]}, "metrics": {"epoch": 2},
                     "checkpoint": str(checkpoint), "error": None}  # fmt: skip
        for k in folds[1:]:
            key = f"{t}/fold{k}"
            trials[key] = {"key": key, "stage": "fold", "cfg": {**base, "val_fold": k}, "metrics": {"epoch": 2},
                           "checkpoint": str(checkpoint), "error": None}  # fmt: skip
    cfg.out_dir.mkdir(parents=True)
    (cfg.out_dir / "trials.json").write_text(json.dumps({"sweep": "s", "finalists": finalists, "trials": trials}))
    return cfg


def _run(cfg: SweepConfig, test: Path, **kw: Any) -> None:
    from geopose_ray.ensemble.job import EnsembleOptions, run_ensemble

    run_ensemble(cfg, EnsembleOptions(test, out_dir=cfg.out_dir / "ens", **kw))


def test_members_are_the_finalists_with_one_model_per_fold(cache: Path, tmp_path: Path, checkpoint: Path) -> None:
    cfg = _sweep(cache, tmp_path, checkpoint, [0, 1, 2, 3], ["b"])
    (member,) = find_members(cfg.out_dir)
    assert member.name == "b" and [f.val_fold for f in member.folds] == [0, 1, 2, 3]
    assert [f.key for f in member.folds] == ["b", "b/fold1", "b/fold2", "b/fold3"]
    assert all(f.checkpoint == str(checkpoint / "best.pt") for f in member.folds)
    assert [m.name for m in find_members(cfg.out_dir, ["a", "b"])] == ["a", "b"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no sweep", r"no finished sweep here \(trials.json missing\); run sweeps/screen.py first"),
        ("no finalists", r"has no finalists to ensemble; give members by name"),
        ("unknown member", r"no screening trial 'zz' in .*; the trials are \['a', 'b'\]"),
        ("missing checkpoint", r"no best.pt or last.pt for fold model a/fold2"),
        ("missing fold", r"the members share fold models on folds \[0\] only \(a: \[0\]\); an out-of-fold fit needs"),
        ("other resolution", r"trained at 1/4 resolution, the others and the cache at 1/2"),
        ("corrupt checkpoint", r"cannot read fold model a \(.*: not a readable checkpoint \(not a torch.save archive"),
        ("empty test dir", r"no test tiles"),
    ],
)
def test_bad_input_fails_before_any_inference(
    cache: Path, dataset: Path, tmp_path: Path, checkpoint: Path, case: str, message: str
) -> None:
    folds = [0] if case == "missing fold" else [0, 1, 2, 3]
    cfg = _sweep(cache, tmp_path, checkpoint, folds, [] if case == "no finalists" else ["a"])
    test = dataset / "test"
    kw: dict[str, Any] = {}
    trials_path = cfg.out_dir / "trials.json"
    saved = json.loads(trials_path.read_text())
    if case == "no sweep":
        trials_path.unlink()
    elif case == "unknown member":
        kw["members"] = ("zz",)
    elif case == "missing checkpoint":
        saved["trials"]["a/fold2"]["checkpoint"] = str(tmp_path / "gone")
    elif case in ("other resolution", "corrupt checkpoint"):
        other = tmp_path / "other"
        shutil.copytree(checkpoint, other)
        if case == "other resolution":
            state = load_checkpoint(other / "best.pt")
            save_checkpoint(other / "best.pt", {**state, "downsample": 4})
        else:
            (other / "best.pt").write_bytes(b"not a checkpoint")
        saved["trials"]["a"]["checkpoint"] = str(other)
    elif case == "empty test dir":
        test = tmp_path / "empty"
        test.mkdir()
    if case != "no sweep":
        trials_path.write_text(json.dumps(saved))
    with pytest.raises(DataError, match=message):
        _run(cfg, test, **kw)
    assert not (cfg.out_dir / "ens" / "submission").exists()  # nothing was predicted


def _member(name: str, folds: list[int], checkpoint: Path) -> Member:
    return Member(name, name, tuple(FoldModel(f"{name}/fold{k}", str(checkpoint / "best.pt"), k) for k in folds))


def test_members_with_different_fold_coverage_are_fitted_on_the_folds_they_share(cache: Path, checkpoint: Path) -> None:
    """a has a model per fold, b (a finalist with fold runs on folds 2 only) models validated on 0 and 2. Pooling
    each member over its own folds would score b's fold-1 and fold-3 tiles with models that trained on them: the
    fit takes the tiles of folds 0 and 2 only, and a worker asked for b's fold-1 prediction refuses."""
    from geopose_ray.ensemble.infer import oof_fold
    from geopose_ray.ensemble.job import default_members, shared_folds

    a, b = _member("a", [0, 1, 2, 3], checkpoint), _member("b", [0, 2], checkpoint)
    assert shared_folds([a, b], [0, 1, 2, 3]) == [0, 2]
    assert shared_folds([a], [0, 1, 2, 3]) == [0, 1, 2, 3]
    assert default_members([a, b, _member("c", [0], checkpoint)]) == [a, b]  # the finalists with fold runs
    with pytest.raises(DataError, match=r"member b has 0 fold models validated on fold 1, not one"):
        oof_fold([a, b], str(cache), 1, "none", "cpu", 1)
    tiles = oof_fold([a, b], str(cache), 2, "none", "cpu", 1)
    assert tiles and {t.fold for t in tiles} == {2}
    with pytest.raises(DataError, match=r"share fold models on folds \[0\] only"):
        shared_folds([a, _member("c", [0], checkpoint)], [0, 1, 2, 3])


@pytest.mark.slow
def test_the_ensemble_job_on_a_real_sweep(
    cache: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sweeps/screen.py, then sweeps/ensemble.py on its finalists: a complete submission and archive, a fit whose
    weights are non-negative and sum to 1, a test score, the OOF statistics kept and reused, an MLflow run."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    sweep = {
        "name": "e", "cache": str(cache), "storage_path": str(tmp_path / "runs"), "rungs": [1, 2], "eta": 2,
        "grid": {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3, 3e-3], "accumulation": [1]},
        "train": {"batch_size": 4},
    }  # fmt: skip
    y = tmp_path / "e.yaml"
    y.write_text(yaml.safe_dump(sweep))
    done = subprocess.run(
        [sys.executable, str(root / "sweeps" / "screen.py"), "--config", str(y)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cmd = [sys.executable, str(root / "sweeps" / "ensemble.py"), "--config", str(y), "--test", str(dataset / "test"),
           "--truth", str(dataset / "test_truth"), "--tta", "flip"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "e" / "ensemble"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == 4 and "test score:" in done.stdout
    assert abs(sum(summary["weights"].values()) - 1) < 1e-9 and min(summary["weights"].values()) >= 0
    assert summary["progression"][0][0].startswith("best single model")
    stems = sorted(p.name for p in (out / "submission").iterdir())
    with tarfile.open(out / "submission.tar.gz") as tar:
        assert sorted(tar.getnames()) == stems and len(stems) == 8  # AGL and VFLOW per test tile
    assert len(list(out.glob("oof-*.pkl"))) == 1
    from geopose_ray.tracking import Tracker

    cfg = SweepConfig.from_yaml(y)
    tracker = Tracker(cfg.mlflow_uri, "e", "e")
    runs = tracker._client.search_runs([tracker._experiment()], filter_string="tags.kind = 'ensemble'")
    assert len(runs) == 1 and runs[0].data.metrics["test_score"] == pytest.approx(summary["test_score"])
    assert {"progression.csv", "progression.png", "fit.json"} <= {
        a.path for a in tracker._client.list_artifacts(runs[0].info.run_id)
    }
    # A second run reuses the OOF statistics and reattaches the same MLflow run.
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and len(list(out.glob("oof-*.pkl"))) == 1
    assert len(tracker._client.search_runs([tracker._experiment()], filter_string="tags.kind = 'ensemble'")) == 1


def test_oof_statistics_are_cached_atomically_and_an_unreadable_cache_is_recomputed(
    cache: Path, dataset: Path, tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OOF stage on its own, Ray's tasks replaced: the first run computes and keeps ``oof-<fingerprint>.pkl``
    (no temporary file left beside it), the next reuses it without a task, a truncated one is recomputed."""
    import geopose_ray.cluster.ensemble as cluster_ensemble
    from geopose_ray.ensemble.job import EnsembleOptions, _check, _oof_statistics

    cfg = _sweep(cache, tmp_path, checkpoint, [0, 1, 2, 3], ["a"])
    job = _check(cfg, EnsembleOptions(dataset / "test", out_dir=tmp_path / "ens"))
    job.out.mkdir(parents=True)
    calls: list[list[int]] = []

    def fake(members: Any, cache_path: str, folds: list[int], *rest: Any) -> list[Any]:
        calls.append(list(folds))
        return [{"fold": k} for k in folds]

    monkeypatch.setattr(cluster_ensemble, "oof_on_ray", fake)
    first = _oof_statistics(job)
    (kept,) = list(job.out.iterdir())
    assert kept.name.startswith("oof-") and kept.suffix == ".pkl" and calls == [[0, 1, 2, 3]]
    assert _oof_statistics(job) == first and len(calls) == 1  # reused, no task
    kept.write_bytes(kept.read_bytes()[:10])  # a file cut short
    assert _oof_statistics(job) == first and len(calls) == 2
    assert list(job.out.iterdir()) == [kept]


def test_gsd_check_on_the_members_configs(dataset: Path, tmp_path: Path) -> None:
    """The up-front check on fold models' configs alone (no model built): needed only when one uses metadata."""
    import math

    from data_root import data_root

    from geopose_ray.ensemble.job import check_test_gsd

    root = data_root(dataset, tmp_path / "root", ("test",))
    test = root / "test"
    stems = sorted(p.name[: -len("_RGB.j2k")] for p in test.glob("*_RGB.j2k"))
    plain = {"a": {"model": {"encoder": "x"}}, "a/fold1": {"model": {"metadata": False}}}
    uses = {**plain, "b/fold2": {"model": {"metadata": True}}}
    path, gsd = check_test_gsd(uses, test, stems)
    assert path == root / "metadata.csv" and all(gsd[s] > 0 for s in stems)
    lines = (root / "metadata.csv").read_text().splitlines()
    drop = {s.split("_")[1] for s in stems[:3]}
    (root / "metadata.csv").write_text("\n".join(ln for ln in lines if ln.split(",")[0] not in drop) + "\n")
    _, gsd = check_test_gsd(plain, test, stems)  # no member needs it: NaN, no error
    assert [math.isnan(gsd[s]) for s in stems] == [True, True, True, False]
    with pytest.raises(DataError) as e:
        check_test_gsd(uses, test, stems)
    message = str(e.value)
    assert message.startswith(f"{root / 'metadata.csv'}: 3 of 4 tile(s) of {test} have no finite gsd > 0 (")
    assert ", ".join(stems[:3]) in message and "fold model b/fold2 (it uses gsd) needs it" in message
    assert "\n" not in message
    (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")  # --metadata PATH: a complete copy elsewhere
    assert check_test_gsd(uses, test, stems, tmp_path / "meta.csv")[0] == tmp_path / "meta.csv"
    (root / "metadata.csv").unlink()
    with pytest.raises(DataError, match=r"no metadata\.csv beside the tiles or at the data root"):
        check_test_gsd(uses, test, stems)
    assert all(math.isnan(g) for g in check_test_gsd(plain, test, stems)[1].values())


def test_a_member_that_uses_gsd_is_checked_before_any_model_loads(
    cache: Path, dataset: Path, tmp_path: Path, checkpoint: Path
) -> None:
    """The job's own check: a fold model's checkpoint config (read memory-mapped) says it uses metadata, a test
    tile has no gsd: refused in one line, before the OOF stage; with the data root's metadata.csv it passes, and
    the gsd resolved on the head travels to the workers with the job's finish."""
    from data_root import data_root

    from geopose_ray.ensemble.infer import test_inputs
    from geopose_ray.ensemble.job import EnsembleOptions, _check, _Finish

    other = tmp_path / "meta-model"
    shutil.copytree(checkpoint, other)
    state = load_checkpoint(other / "best.pt")
    config = {**state["config"], "model": {**state["config"]["model"], "metadata": True}}
    save_checkpoint(other / "best.pt", {**state, "config": config})
    cfg = _sweep(cache, tmp_path, checkpoint, [0, 1, 2, 3], ["a"])
    trials_path = cfg.out_dir / "trials.json"
    saved = json.loads(trials_path.read_text())
    saved["trials"]["a/fold2"]["checkpoint"] = str(other)
    trials_path.write_text(json.dumps(saved))
    bare = tmp_path / "bare-test"
    shutil.copytree(dataset / "test", bare, ignore=shutil.ignore_patterns("metadata.csv"))
    with pytest.raises(DataError, match=r"no metadata.csv beside the tiles .*fold model a/fold2 \(it uses gsd\)"):
        _run(cfg, bare)
    assert not (cfg.out_dir / "ens").exists()  # refused before anything ran
    root = data_root(dataset, tmp_path / "root", ("test",))
    job = _check(cfg, EnsembleOptions(root / "test", out_dir=tmp_path / "ens"))
    assert job.meta_path == root / "metadata.csv" and set(job.gsd) == set(job.stems)
    finish = _Finish(None, [], job.gsd)  # type: ignore[arg-type]
    inputs = test_inputs(job.test_dir, job.stems, finish.test_gsd)
    assert [inputs[s][1] for s in job.stems] == [job.gsd[s] for s in job.stems]
    explicit = _check(cfg, EnsembleOptions(bare, out_dir=tmp_path / "ens", metadata=root / "metadata.csv"))
    assert explicit.gsd == job.gsd

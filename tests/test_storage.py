"""A sweep's remote storage: checkpoint locations recorded as URIs any node can open, files fetched from them,
and the ensemble's members read from them. Against a real S3-compatible server (moto's, on loopback), through
the same pyarrow filesystem Ray Tune writes with."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest
import torch

from geopose_ray.engine import TrainConfig
from geopose_ray.engine.checkpoint import load_checkpoint, save_checkpoint
from geopose_ray.engine.predict import load_model
from geopose_ray.ensemble.members import check_members, find_members
from geopose_ray.errors import DataError
from geopose_ray.storage import cached_copy, checkpoint_location, copy_file, join, local_file, redact, stat


def _upload(storage: str, relative: str, files: dict[str, bytes]) -> pyarrow.fs.FileSystem:
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    for name, data in files.items():
        with fs.open_output_stream(f"{root}/{relative}/{name}") as out:
            out.write(data)
    return fs


def test_a_remote_checkpoint_is_recorded_as_a_uri_that_opens_it(s3: str, tmp_path: Path) -> None:
    fs = _upload(s3, "s-screen/t1/checkpoint_000002", {"last.pt": b"weights"})
    # What Tune hands the driver: the storage's filesystem and a bucket-relative path without scheme or query.
    location = checkpoint_location(fs, "bucket/sweeps/s-screen/t1/checkpoint_000002", s3)
    query = s3.partition("?")[2]
    assert location == f"s3://key:secret@bucket/sweeps/s-screen/t1/checkpoint_000002?{query}"
    assert join(location, "last.pt") == f"s3://key:secret@bucket/sweeps/s-screen/t1/checkpoint_000002/last.pt?{query}"
    assert stat(join(location, "last.pt")) is not None and stat(join(location, "best.pt")) is None
    assert local_file(join(location, "last.pt"), tmp_path).read_bytes() == b"weights"
    # A local storage path: an absolute directory, as before.
    local = checkpoint_location(pyarrow.fs.LocalFileSystem(), "runs/x/checkpoint_000001", "runs")
    assert local == str(Path("runs/x/checkpoint_000001").resolve())
    assert join(local, "last.pt") == str(Path(local) / "last.pt") == join(f"file://{local}", "last.pt")


def test_files_are_downloaded_once_and_errors_name_the_file_without_credentials(s3: str, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    _upload(s3, "s-screen/t2/checkpoint_000001", {"last.pt": data})
    fs, root = pyarrow.fs.FileSystem.from_uri(s3)
    location = checkpoint_location(fs, f"{root}/s-screen/t2/checkpoint_000001", s3)
    first = local_file(join(location, "last.pt"), tmp_path)
    assert first.read_bytes() == data and first.is_relative_to(tmp_path)
    before = first.stat().st_mtime_ns
    assert local_file(join(location, "last.pt"), tmp_path) == first and first.stat().st_mtime_ns == before
    assert [p.name for p in first.parent.iterdir()] == ["last.pt"]  # no partial download left beside it

    with pytest.raises(DataError, match=r"no such file on the sweep's storage") as e:
        local_file(join(location, "best.pt"), tmp_path)
    assert "secret" not in str(e.value) and "s3://***@bucket/sweeps/s-screen/t2/checkpoint_000001/best.pt" in str(
        e.value
    )
    assert redact("gs://bucket/x") == "gs://bucket/x" and redact("/tmp/a@b") == "/tmp/a@b"
    # copy_file: the same bytes at a path of the caller's (a trial resuming from a reopened sweep's checkpoint).
    (tmp_path / "work").mkdir()
    copy_file(join(location, "last.pt"), tmp_path / "work" / "last.pt")
    assert (tmp_path / "work" / "last.pt").read_bytes() == data
    with pytest.raises(DataError, match=r"no such file; was the sweep's storage moved"):
        copy_file(tmp_path / "gone" / "last.pt", tmp_path / "work" / "x.pt")
    with pytest.raises(DataError, match=r"^s3://\*\*\*@gone/x/last\.pt\?endpoint_override=.*: no such file on"):
        local_file(f"s3://key:secret@gone/x/last.pt?{s3.partition('?')[2]}", tmp_path)


def test_names_that_need_escaping_a_rewritten_file_and_pyarrow_errors(s3: str, tmp_path: Path) -> None:
    """A sweep may be named "my sweep#2": its recorded location still opens the file. A file rewritten with the
    same size is downloaded again (the copy keeps the original's modification time). Credentials quoted in
    pyarrow's own error text are redacted too."""
    fs = _upload(s3, "my sweep#2-screen/t3/checkpoint_000001", {"last.pt": b"aaaa"})
    location = checkpoint_location(fs, "bucket/sweeps/my sweep#2-screen/t3/checkpoint_000001", s3)
    assert "my%20sweep%232-screen" in location and location.endswith(s3.partition("?")[2])
    first = local_file(join(location, "last.pt"), tmp_path)
    assert first.read_bytes() == b"aaaa"
    time.sleep(1.1)  # the store's modification times count whole seconds
    _upload(s3, "my sweep#2-screen/t3/checkpoint_000001", {"last.pt": b"bbbb"})
    assert local_file(join(location, "last.pt"), tmp_path).read_bytes() == b"bbbb"

    assert (
        redact("failed: 's3://key:secret@bucket/x' and gs://a:b@c/d") == "failed: 's3://***@bucket/x' and gs://***@c/d"
    )
    with pytest.raises(DataError) as e:
        stat("s3://key:secret@bucket/x?endpoint_override=[bad")
    assert "secret" not in str(e.value)


def test_the_ensemble_reads_its_members_from_remote_storage(
    s3: str,
    checkpoint_dir: Path,
    checkpoint_config: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finished sweep whose checkpoints live on the bucket: the members are found and every checkpoint loads
    through its URI, as the ensemble's workers on other nodes will; the head downloads none to check them."""
    cfg = TrainConfig.from_dict(checkpoint_config)
    shutil.copytree(checkpoint_dir, tmp_path / "trained")
    fs, root = pyarrow.fs.FileSystem.from_uri(s3)
    files = {name: (tmp_path / "trained" / name).read_bytes() for name in ("last.pt", "best.pt")}
    trials = {}
    for key, fold in (("a", 0), ("a/fold1", 1), ("a/fold2", 2), ("a/fold3", 3)):
        relative = f"s-screen/{key.replace('/', '_')}/checkpoint_000001"
        _upload(s3, relative, files if key != "a/fold3" else {"last.pt": files["last.pt"]})
        trials[key] = {
            "key": key,
            "stage": "fold" if "/" in key else "screen",
            "cfg": {**cfg.to_dict(), "val_fold": fold},
            "metrics": {"epoch": 1},
            "checkpoint": checkpoint_location(fs, f"{root}/{relative}", s3),
            "error": None,
        }
    (tmp_path / "trials.json").write_text(json.dumps({"sweep": "s", "finalists": ["a"], "trials": trials}))
    monkeypatch.setenv("GEOPOSE_RAY_STORAGE_CACHE", str(tmp_path / "fetched"))
    (member,) = find_members(tmp_path)
    assert [f.checkpoint.split("?")[0].split("/")[-1] for f in member.folds] == ["best.pt"] * 3 + ["last.pt"]
    assert all(f.checkpoint.startswith("s3://key:secret@bucket/sweeps/s-screen/") for f in member.folds)
    # The head does not download remote fold models to check them: the workers that load them do.
    assert check_members([member], downsample=load_checkpoint(tmp_path / "trained" / "best.pt")["downsample"]) == {}
    assert not (tmp_path / "fetched").exists()
    model, loaded_cfg, _ = load_model(member.folds[1].checkpoint, torch.device("cpu"))
    reference, _, _ = load_model(tmp_path / "trained" / "best.pt", torch.device("cpu"))
    assert loaded_cfg == cfg
    for (k, v), (_, w) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    load_model(member.folds[1].checkpoint, torch.device("cpu"))
    assert len(list((tmp_path / "fetched").rglob("*.pt"))) == 1  # the one loaded, fetched once into the cache

    fs.delete_dir(f"{root}/s-screen/a_fold2")
    with pytest.raises(DataError, match=r"no best.pt or last.pt for fold model a/fold2") as e:
        find_members(tmp_path)
    assert "secret" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other resolution", r"fold model a/fold2 was trained at 1/4 resolution, the others and the cache at 1/2"),
        ("corrupt checkpoint", r"cannot read fold model a/fold2 \(.*not a readable checkpoint"),
    ],
)
def test_a_bad_remote_fold_model_stops_the_ensemble_job_with_the_workers_error(
    ray_cluster: None,
    s3: str,
    cache: Path,
    checkpoint_dir: Path,
    checkpoint_config: dict[str, Any],
    dataset: Path,
    tmp_path: Path,
    case: str,
    message: str,
) -> None:
    """The ensemble job on a sweep stored on the bucket, one of whose fold models is bad: the Ray worker that
    loads it finds it, and the job stops with that error, naming the checkpoint without credentials (not Ray's
    task error and the worker's traceback), before any submission is written."""
    from geopose_ray.ensemble.job import EnsembleOptions, run_ensemble
    from geopose_ray.sweep.config import SweepConfig

    cfg = TrainConfig.from_dict(checkpoint_config)
    shutil.copytree(checkpoint_dir, tmp_path / "trained")
    good = (tmp_path / "trained" / "best.pt").read_bytes()
    if case == "other resolution":
        state = load_checkpoint(tmp_path / "trained" / "best.pt")
        assert state["downsample"] == 2
        save_checkpoint(tmp_path / "other.pt", {**state, "downsample": 4})
        bad = (tmp_path / "other.pt").read_bytes()
    else:
        bad = b"not a checkpoint"
    fs, root = pyarrow.fs.FileSystem.from_uri(s3)
    name = f"bad-{case.replace(' ', '-')}"  # a sweep of its own on the session's bucket
    trials = {}
    for key, fold in (("a", 0), ("a/fold1", 1), ("a/fold2", 2), ("a/fold3", 3)):
        relative = f"{name}-screen/{key.replace('/', '_')}/checkpoint_000001"
        _upload(s3, relative, {"best.pt": bad if key == "a/fold2" else good})
        trials[key] = {
            "key": key, "stage": "fold" if "/" in key else "screen", "cfg": {**cfg.to_dict(), "val_fold": fold},
            "metrics": {"epoch": 1}, "checkpoint": checkpoint_location(fs, f"{root}/{relative}", s3), "error": None,
        }  # fmt: skip
    _upload(s3, name, {"trials.json": json.dumps({"sweep": name, "finalists": ["a"], "trials": trials}).encode()})
    sweep = SweepConfig.from_dict({"name": name, "cache": str(cache), "storage_path": s3})
    (member,) = find_members(sweep.files.home)
    assert check_members([member], downsample=2) == {}  # so the error below can only come from a worker
    out = tmp_path / "ens"
    # The local Ray's workers were started before this test, so they fetch into the default cache: cleaned below.
    fetched = [cached_copy(f.checkpoint).parent for f in member.folds]
    try:
        with pytest.raises(DataError, match=message) as e:
            run_ensemble(sweep, EnsembleOptions(dataset / "test", out_dir=out))
    finally:
        for directory in fetched:
            shutil.rmtree(directory, ignore_errors=True)
    assert type(e.value) is DataError  # the worker's own error, not Ray's wrapper of it
    assert f"s3://***@bucket/sweeps/{name}-screen/a_fold2/checkpoint_000001/best.pt" in str(e.value)
    assert "secret" not in str(e.value) and "Traceback" not in str(e.value)
    assert not (out / "submission").exists() and not list(out.glob("oof-*"))


def test_a_sweeps_own_files_live_on_its_storage_and_a_driver_elsewhere_starts_from_them(
    s3: str, tmp_path: Path
) -> None:
    """The results table, promoter state and trial records of a sweep on an object store are written beside its
    checkpoints; a driver in another directory (a new head, another job) brings its stale working copies up to
    date from there, and the scheduler Tune restores from the first driver's pickle reads and writes the new
    driver's files, not the first one's."""
    import pickle
    import shutil

    from geopose_ray.cluster.callback import MlflowCallback
    from geopose_ray.cluster.restore import restoring_into
    from geopose_ray.cluster.scheduler import PromoterScheduler
    from geopose_ray.sweep.files import PROMOTER, RESULTS, TRIALS, SweepFiles
    from geopose_ray.sweep.promoter import Promoter
    from geopose_ray.sweep.table import SweepTable

    home = join(s3, "own")
    first = SweepFiles(home, tmp_path / "head0" / "runs" / "own")
    later = SweepFiles(home, tmp_path / "head1" / "runs" / "own")
    # The second head saw the sweep once, at its start: its working copies are stale.
    later.write(PROMOTER, json.dumps({"promoter": Promoter([1, 2], 2).to_dict(), "resume": []}))
    later.write(RESULTS, "trial\n")
    # As Tune keeps them: the scheduler and the MLflow callback with its results table, sharing the promoter.
    at_start = Promoter([1, 2], 2)
    old_table = SweepTable(first, [1, 2])
    scheduler = pickle.dumps(
        (PromoterScheduler(at_start, files=first), MlflowCallback(None, at_start, "screen", old_table))  # type: ignore[arg-type]
    )

    promoter = Promoter([1, 2], 2, min_results=1)
    promoter.on_result("a", 1, 0.5, 0.1)  # paused at rung 1
    first.write(PROMOTER, json.dumps({"promoter": promoter.to_dict(), "resume": ["a"]}))
    first.write(TRIALS, '{"round": 0}')
    first.remove((RESULTS,))  # a file the home no longer has
    assert later.read(PROMOTER) == first.working_copy(PROMOTER)  # the home has what the first head wrote
    assert later.working_copy(TRIALS) is None

    shutil.rmtree(tmp_path / "head0")  # the first head is gone
    later.pull()
    assert later.working_copy(TRIALS) == '{"round": 0}' and later.working_copy(RESULTS) is None
    table = SweepTable(later, [1, 2])
    with restoring_into(later, table=table):
        restored, callback = pickle.loads(scheduler)
    assert restored.files is later and callback.table is table
    assert callback.promoter is restored.promoter
    assert restored.promoter.paused == {"a": 0} and restored.dispatch.resume == ["a"]
    assert restored.promoter.spent_gpu_hours == pytest.approx(0.1)
    restored.promoter.on_result("b", 1, 0.7, 0.2)
    restored._save()
    assert json.loads(first.read(PROMOTER) or "")["promoter"]["gpu_hours"] == {"a": 0.1, "b": 0.2}
    assert not (tmp_path / "head0").exists()  # nothing written where the pickling driver was

    later.remove((PROMOTER, TRIALS))  # a sweep started afresh: gone from the home and the working copies
    assert later.read(PROMOTER) is None and later.working_copy(PROMOTER) is None and first.read(TRIALS) is None


def test_a_sweeps_files_are_kept_locally_when_its_storage_cannot_be_written_and_go_up_later(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While the sweep runs, a failed write to the storage is logged once, and the storage is not tried again at
    every change; at the end of a stage it is an error that names the working copy to upload, without
    credentials. The next driver that continues the sweep from that directory uploads the working copy rather
    than take the storage's older file."""
    from geopose_ray.errors import GeoposeError
    from geopose_ray.sweep import files as sweep_files
    from geopose_ray.sweep.files import PROMOTER, SweepFiles

    tries: list[str] = []

    def counted(location: str, text: str) -> None:
        tries.append(text)
        storage_write(location, text)

    storage_write = sweep_files.write_text
    monkeypatch.setattr(sweep_files, "write_text", counted)
    monkeypatch.setattr(sweep_files, "RETRIES", (0.0,))
    local = tmp_path / "runs" / "s"
    good = SweepFiles(join(s3, "later"), local)
    good.write(PROMOTER, "0")
    down = SweepFiles(s3.replace("@bucket/", "@no-such-bucket/"), local)  # the same sweep, its store unreachable
    with caplog.at_level("WARNING", logger="geopose_ray.sweep.files"):
        down.write(PROMOTER, "1", required=False)
        down.write(PROMOTER, "2", required=False)
    assert down.working_copy(PROMOTER) == "2" and tries == ["0", "1"]  # the second change waited for the backoff
    assert (local / ".promoter.json.pending").exists()  # a driver killed now leaves it to go up later
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "cannot write it" in warned[0] and "secret" not in warned[0]
    with pytest.raises(GeoposeError) as e:
        down.write(PROMOTER, "3")
    message = str(e.value)
    assert f"{(local / PROMOTER).resolve()}: copy it to s3://***@no-such-bucket/" in message
    assert "secret" not in message and down.working_copy(PROMOTER) == "3" and tries[-2:] == ["3", "3"]

    assert good.read(PROMOTER) == "0"  # the store is back: it still has the old state
    good.pull()  # this directory's copy never reached it: it goes up, it is not replaced
    assert good.read(PROMOTER) == good.working_copy(PROMOTER) == "3"
    assert not (local / ".promoter.json.pending").exists()
    good.write(PROMOTER, "4")
    SweepFiles(join(s3, "later"), tmp_path / "elsewhere").write(PROMOTER, "5")  # another head goes on
    good.pull()  # nothing pending here now: the storage's newer file wins
    assert good.working_copy(PROMOTER) == "5"

    time.sleep(1.1)  # the store keeps modification times to the second
    with caplog.at_level("WARNING", logger="geopose_ray.sweep.files"):
        down.write(PROMOTER, "6", required=False)  # this head's write fails again (pending) ...
        time.sleep(1.1)
        SweepFiles(join(s3, "later"), tmp_path / "elsewhere").write(PROMOTER, "7")  # ... and the sweep goes on
        good.pull()  # elsewhere: the newer file is kept, this head's older one set aside
    assert good.read(PROMOTER) == good.working_copy(PROMOTER) == "7"
    (aside,) = local.glob("promoter.json.unsent-*")
    assert aside.read_text() == "6" and "newer promoter.json" in caplog.records[-1].getMessage()


def test_a_sweep_on_an_object_store_needs_a_name_tune_can_restore_there(s3: str, tmp_path: Path) -> None:
    from geopose_ray.errors import ConfigError
    from geopose_ray.sweep.config import SweepConfig

    for name in ("my sweep#2", "..", "ü"):
        with pytest.raises(ConfigError, match="The value of `name` is"):
            SweepConfig(name=name, cache=str(tmp_path), storage_path=s3).validate()
    with pytest.raises(ConfigError, match="not a training cache"):  # a name like this is fine
        SweepConfig(name="screen-t4_v1.2", cache=str(tmp_path), storage_path=s3).validate()


def test_text_that_is_not_utf8_is_a_clear_error(s3: str) -> None:
    from geopose_ray.storage import read_text

    _upload(s3, "bad", {"trials.json": b"\xff\xfe{}"})
    with pytest.raises(DataError, match=r"s3://\*\*\*@bucket/sweeps/bad/trials.json\?.*: not UTF-8 text") as e:
        read_text(join(join(s3, "bad"), "trials.json"))
    assert "secret" not in str(e.value)

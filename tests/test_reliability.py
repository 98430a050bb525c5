"""Faults that must not lose work: unreadable training tiles, a kill or a full disk during a checkpoint write."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trial_files import epochs_once

from geopose_ray.data.cache import TrainingCache
from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.engine.checkpoint import load_checkpoint, save_checkpoint
from geopose_ray.errors import DataError


def _corrupt(cache: Path, tmp_path: Path, fold_is_val: bool) -> tuple[Path, str]:
    """A copy of the cache with one tile's image file overwritten by garbage (a training tile, or a validation
    tile of fold 0)."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    row = next(r for r in TrainingCache(copy).rows if (r.fold == 0) == fold_is_val)
    (rgb,) = (copy / "entries").glob(f"{row.stem}*rgb*.npy")
    rgb.write_bytes(b"\x00garbage, not a .npy file")
    return copy, row.stem


def _cfg(cache: Path, **over: object) -> TrainConfig:
    return TrainConfig.from_dict(
        {"cache": str(cache), "model": {"encoder": "tu-test_resnet"}, "epochs": 1, "batch_size": 4, **over}
    )


def test_an_unreadable_training_tile_is_skipped_counted_and_warned(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy, stem = _corrupt(cache, tmp_path, fold_is_val=False)
    with caplog.at_level(logging.WARNING):
        history = Trainer(_cfg(copy), tmp_path / "run").fit()
    assert history[0]["bad_tiles"] == 1 and history[0]["val_bad_tiles"] == 0
    assert any(stem in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run" / "last.pt").exists()


def test_an_unreadable_validation_tile_is_scored_once_not_twice(cache: Path, tmp_path: Path) -> None:
    copy, _ = _corrupt(cache, tmp_path, fold_is_val=True)
    trainer = Trainer(_cfg(copy), tmp_path / "run")
    metrics, stats = trainer.validate()
    n_val = len([r for r in TrainingCache(copy).rows if r.fold == 0])
    assert metrics["val_bad_tiles"] == 1 and len(stats) == n_val - 1
    assert len({s.stem for s in stats}) == len(stats)  # no tile counted twice


def test_bad_tiles_fail_stops_at_once_naming_the_tile(cache: Path, tmp_path: Path) -> None:
    copy, stem = _corrupt(cache, tmp_path, fold_is_val=False)
    with pytest.raises(DataError, match=rf"{stem}: training tile cannot be read .*rerun geopose-ray prepare"):
        Trainer(_cfg(copy, bad_tiles="fail"), tmp_path / "run").fit()


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    """SIGKILL a process while it writes a large checkpoint over an existing one, after the new bytes are on disk
    but before the rename: the old file is intact and loads."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 3, "w": torch.zeros(4)})
    script = textwrap.dedent(f"""
        import os, signal, torch
        from geopose_ray import fsutil
        from geopose_ray.engine.checkpoint import save_checkpoint
        def die(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        fsutil.os.fsync = die
        save_checkpoint({str(path)!r}, {{"epoch": 4, "w": torch.ones(1_000_000)}})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    assert any(p.name.startswith(".last.pt.tmp-") for p in tmp_path.iterdir())  # it was mid-write
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.zeros(4))


def test_a_full_disk_during_a_checkpoint_write_leaves_the_previous_one_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geopose_ray import fsutil

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 3})

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"epoch": 4})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``."""
    rows = [line.split(None, 2) for line in subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True
    ).stdout.splitlines()]  # fmt: skip
    children: dict[int, list[tuple[int, str]]] = {}
    for r in rows:
        if len(r) == 3:
            children.setdefault(int(r[1]), []).append((int(r[0]), r[2]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


@pytest.mark.slow
def test_a_trial_killed_mid_training_resumes_from_its_checkpoint_and_ends_as_if_never_killed(
    cache: Path, tmp_path: Path
) -> None:
    """SIGKILL the worker process running a trial after its first epoch: Ray restarts the trial from its last
    checkpoint (no completed epoch is lost or repeated) and its final weights' metrics equal an uninterrupted
    run with the same seed (CPU, deterministic)."""
    import json
    import signal
    import time

    import yaml

    root = Path(__file__).resolve().parents[1]
    sweep = {
        "name": "p", "cache": str(cache), "storage_path": str(tmp_path / "runs"), "rungs": [4], "eta": 2,
        "grid": {"encoders": ["tu-test_resnet"], "decoders": ["Unet"], "lrs": [1e-3], "accumulation": [1]},
        "train": {"batch_size": 4},
    }  # fmt: skip
    y = tmp_path / "p.yaml"
    y.write_text(yaml.safe_dump(sweep))
    proc = subprocess.Popen(
        [sys.executable, str(root / "sweeps" / "screen.py"), "--config", str(y)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    screen = tmp_path / "runs" / "p-screen"
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        done = [d for d in screen.glob("*/result.json") if d.read_text().count("\n") >= 1]
        if done:
            workers = [(pid, args) for pid, args in _descendants(proc.pid) if "ImplicitFunc" in args]
            if workers:
                killed = workers[0][0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    assert killed is not None, "the trial finished or never started before it could be killed"
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (trial_dir,) = [d for d in screen.iterdir() if (d / "result.json").exists()]
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    assert epochs_once(trial_dir) == [1, 2, 3, 4]  # nothing lost, nothing trained twice
    assert any("error" in p.name for p in trial_dir.iterdir())  # Ray recorded the worker's death
    # The same config trained straight through, in this process, single-threaded as the trial is.
    saved = json.loads((tmp_path / "runs" / "p" / "trials.json").read_text())
    cfg = TrainConfig.from_dict(saved["trials"][trial_dir.name]["cfg"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = Trainer(cfg, tmp_path / "straight").fit()
    finally:
        torch.set_num_threads(threads)
    for key in ("score", "agl_r2", "flow_r2", "train/total"):
        assert results[-1][key] == pytest.approx(straight[-1][key], abs=1e-6), key


def test_unregistered_checkpoints_are_the_complete_contiguous_epochs_after_the_restored_one(tmp_path: Path) -> None:
    """Tune restores epoch 1's checkpoint; epochs 2 and 3 are beside it, epoch 5's too but epoch 4 is missing, and
    a directory Tune created holds nothing yet: epochs 2 and 3 are the candidates, in order. Without its
    reported.json epoch 2 is none. A last.pt torn by a node lost while the worker persisted it (seen in CI) is not
    taken up, and the work directory keeps the checkpoint it had."""
    from ray import tune

    from geopose_ray.cluster.replay import REPORTED, _take_up, _unregistered

    trial = tmp_path / "trial"
    for index, epoch in ((0, 1), (1, 2), (2, 3), (4, 5)):
        d = trial / f"checkpoint_{index:06d}"
        d.mkdir(parents=True)
        save_checkpoint(d / "last.pt", {"epoch": epoch})
        (d / REPORTED).write_text(f'{{"epoch": {epoch}.0, "score": 0.5}}')
    (trial / "checkpoint_000005").mkdir()
    registered = tune.Checkpoint.from_directory(str(trial / "checkpoint_000000"))
    two, three = trial / "checkpoint_000001", trial / "checkpoint_000002"
    assert _unregistered(registered) == [(two, 2), (three, 3)]
    assert _unregistered(tune.Checkpoint.from_directory(str(three))) == []

    work = tmp_path / "work"
    work.mkdir()
    save_checkpoint(work / "last.pt", {"epoch": 1})
    assert _take_up(two, work, 2) == {"epoch": 2.0, "score": 0.5}
    assert load_checkpoint(work / "last.pt")["epoch"] == 2
    assert _take_up(two, work, 3) is None  # not the epoch expected next
    torn = (three / "last.pt").read_bytes()
    (three / "last.pt").write_bytes(torn[: len(torn) // 2])
    assert _take_up(three, work, 3) is None
    assert load_checkpoint(work / "last.pt")["epoch"] == 2 and sorted(p.name for p in work.iterdir()) == [
        "last.pt", REPORTED
    ]  # fmt: skip
    (two / REPORTED).unlink()
    assert _unregistered(registered) == []


def test_a_trial_removes_the_scratch_directories_that_paused_or_killed_trials_left(tmp_path: Path) -> None:
    """A trial's scratch directory (its last.pt and best.pt) outlives a worker killed or an actor ended while the
    training thread waited in tune.report. The next trial on the node removes those of processes of this host that
    are gone and of its own process (a reused actor), and keeps a live process's, another host's (a temp dir
    shared by containers) and anything not named by a host and process id."""
    import socket

    from geopose_ray.cluster.trainable import WORK_PREFIX, _work_dir

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    host = socket.gethostname()
    try:
        names = {
            "gone": f"{host}.{gone.pid}-a1",
            "mine": f"{host}.{os.getpid()}-b2",
            "live": f"{host}.{live.pid}-c3",
            "other host": f"{host}x.{gone.pid}-d4",
            "unknown": "x7k_q2ab",
        }
        left = {k: tmp_path / f"{WORK_PREFIX}{name}" for k, name in names.items()}
        for d in left.values():
            d.mkdir()
            (d / "last.pt").write_bytes(b"\0" * 1024)
        new = _work_dir(tmp_path)
        assert not left["gone"].exists() and not left["mine"].exists()
        for kept in ("live", "other host", "unknown"):
            assert (left[kept] / "last.pt").is_file(), kept
        assert new.is_dir() and new.parent == tmp_path and new.name.startswith(f"{WORK_PREFIX}{host}.{os.getpid()}-")
        assert _work_dir(tmp_path) != new and not new.exists()  # the next trial in this process
    finally:
        live.kill()
        live.wait()

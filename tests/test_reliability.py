"""Faults that must not lose work: unreadable training tiles, a kill or a full disk during a checkpoint write."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

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

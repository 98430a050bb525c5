"""Training recipes: random crops of the cache, schedules, the optimizer's groups, stages and warm starts, top-k
checkpoints and the fp16 retry."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geopose_ray.data.augment import AugmentConfig
from geopose_ray.data.cache import CACHE_FORMAT, TrainingCache
from geopose_ray.data.dataset import GeoposeDataset
from geopose_ray.data.manifest import ManifestRow, write_manifest
from geopose_ray.data.rasters import agl_cm_to_m
from geopose_ray.engine import TrainConfig, Trainer
from geopose_ray.engine.checkpoint import load_checkpoint, save_checkpoint
from geopose_ray.engine.retry import fit_with_retries
from geopose_ray.engine.trainer import LAST, NonFiniteLoss, native_bf16, resolve_amp
from geopose_ray.errors import ConfigError

TINY = {"encoder": "tu-test_resnet", "dropout": 0.5}
SIDE = 96  # the hand-made cache's tile side


def _cfg(cache_dir: Path, **over: Any) -> TrainConfig:
    base: dict[str, Any] = {"cache": str(cache_dir), "model": TINY, "epochs": 2, "batch_size": 4, "lr": 1e-3}
    return TrainConfig.from_dict({**base, **over})


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of two tiles whose every height is distinct (so a pixel of a sample names its source pixel), the
    RGB a function of the position, and a known flow (scale 0.5 px/m, angles 30° and 200°)."""
    root = tmp_path_factory.mktemp("labelled")
    entries = root / "entries"
    entries.mkdir()
    rows = []
    for i, (stem, deg) in enumerate((("JAX_A", 30.0), ("OMA_B", 200.0))):
        r, c = np.mgrid[:SIDE, :SIDE]
        agl_cm = (100 + r * SIDE + c + i * 7).astype(np.uint16)
        agl_cm[5, 7] = 65535  # one no-data pixel
        rgb = np.stack([r * 2, c * 2, (r + c) % 256], axis=-1).astype(np.uint8)
        np.save(entries / f"{stem}.rgb.npy", rgb)
        np.save(entries / f"{stem}.agl.npy", agl_cm)
        row = ManifestRow(stem, stem[:3], 0.3, 0.5, math.radians(deg), i, "x", "y", "z")
        rows.append(row)
        meta = {"city": row.city, "gsd": 0.3, "scale": 0.5, "angle": row.angle, "shape": [SIDE, SIDE]}
        (entries / f"{stem}.json").write_text(json.dumps(meta))
    write_manifest(root / "manifest.csv", rows)
    (root / "cache.json").write_text(json.dumps({"format": CACHE_FORMAT, "downsample": 1, "source": "hand-made"}))
    return root


def _source_positions(sample: dict[str, torch.Tensor], tile_agl_cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample pixel (x, y), source pixel (x, y)) pairs of the sample's valid pixels, found by their heights."""
    valid = sample["valid"][0].numpy()
    cm = np.rint(sample["agl"][0].numpy() * 100).astype(np.int64)
    where = {int(v): (idx % SIDE, idx // SIDE) for idx, v in enumerate(tile_agl_cm.ravel())}
    ys, xs = np.nonzero(valid)
    src = np.array([where[int(cm[y, x])] for y, x in zip(ys, xs, strict=True)], dtype=np.float64)
    return np.stack([xs, ys], axis=1).astype(np.float64), src


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    crop=st.sampled_from([32, 48, 64]),
    scale_range=st.sampled_from([(1.0, 1.0), (0.75, 1.25)]),
    rotate=st.sampled_from([0.0, 30.0]),
)
def test_crops_keep_heights_and_flow_consistent(
    labelled: Path, seed: int, crop: int, scale_range: tuple[float, float], rotate: float
) -> None:
    """Every sample pixel's height is a source pixel's height, and the sample's flow vector is the source flow
    mapped by the linear part of the sample-to-source geometry (crop, resize, quarter turns, flips, rotation)."""
    aug = AugmentConfig(rot90=True, flip=True, rotate_deg=rotate)
    ds = GeoposeDataset(labelled, augment=aug, seed=seed, crop=crop, crops_per_tile=2, crop_scale=scale_range)
    assert len(ds) == 4
    cache = TrainingCache(labelled)
    for index in range(len(ds)):
        sample = ds[index]
        assert sample["image"].shape == (3, crop, crop) and sample["agl"].shape == (1, crop, crop)
        row = ds.rows[index // 2]
        tile = np.load(labelled / "entries" / f"{row.stem}.agl.npy")
        dst, src = _source_positions(sample, tile)
        assert len(dst) > crop * crop // 3  # rotation leaves the corners without data, nothing else
        # src ≈ A dst + t; the flow maps source to sample by A⁻¹ (sample vectors are dst - dst' for src - src').
        design = np.hstack([dst, np.ones((len(dst), 1))])
        fit, *_ = np.linalg.lstsq(design, src, rcond=None)
        a = fit[:2].T  # src = a @ dst + t
        residual = np.abs(design @ fit - src).max()
        assert residual < 1.5 * max(1.0, 1 / scale_range[0])  # nearest-neighbour resampling, nothing worse
        meta = cache.meta(row.stem)
        s0, th0 = float(meta["scale"]), float(meta["angle"])  # type: ignore[arg-type]
        v_src = s0 * np.array([math.sin(th0), math.cos(th0)])
        expected = np.linalg.solve(a, v_src)
        s, th = float(sample["scale"]), float(sample["angle"])
        got = s * np.array([math.sin(th), math.cos(th)])
        assert np.allclose(got, expected, rtol=0.05, atol=0.02 * s0), (got, expected)
        # RGB travels with the heights: the red and green channels encode the source row and column.
        img = sample["image"].numpy()
        ys, xs = dst[:, 1].astype(int), dst[:, 0].astype(int)
        if scale_range == (1.0, 1.0) and rotate == 0.0:  # exact pixel moves only: the colours are the source's
            assert np.array_equal(img[0, ys, xs], (src[:, 1] * 2).astype(np.uint8))
            assert np.array_equal(img[1, ys, xs], (src[:, 0] * 2).astype(np.uint8))


def test_a_crop_is_the_window_of_the_cached_tile(labelled: Path) -> None:
    """Without augmentation a crop is exactly a window of the tile (heights, no-data and colours), and
    ``load(window)`` returns that window without reading the rest."""
    ds = GeoposeDataset(labelled, seed=3, crop=40, crops_per_tile=3)
    cache = TrainingCache(labelled)
    whole = cache.load("JAX_A")
    offsets = set()
    for index in range(3):
        s = ds[index]
        agl = np.where(s["valid"][0].numpy(), s["agl"][0].numpy(), np.nan)
        r0, c0 = np.argwhere(np.isfinite(agl))[0]
        src = round(float(agl[r0, c0]) * 100) - 100
        r, c = src // SIDE - r0, src % SIDE - c0
        offsets.add((r, c))
        np.testing.assert_array_equal(agl, whole.agl[r : r + 40, c : c + 40])
        np.testing.assert_array_equal(s["image"].numpy().transpose(1, 2, 0), whole.image[r : r + 40, c : c + 40])
        window = cache.load("JAX_A", (r, c, 40, 40))
        np.testing.assert_array_equal(window.agl, agl)
        assert float(s["scale"]) == 0.5
    assert len(offsets) == 3  # three different crops of the tile in one epoch
    ds.set_epoch(1)
    assert not np.array_equal(ds[0]["agl"].numpy(), GeoposeDataset(labelled, seed=3, crop=40)[0]["agl"].numpy())
    with pytest.raises(Exception, match="crop 128 is larger than tile"):
        GeoposeDataset(labelled, crop=128)
    raw = np.load(labelled / "entries" / "JAX_A.agl.npy")
    np.testing.assert_array_equal(cache.load("JAX_A", (10, 20, 5, 6)).agl, agl_cm_to_m(raw[10:15, 20:26]))


def test_warmup_floor_and_step_decay(cache: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache, schedule="step", step_at=[1], step_gamma=0.1, lr_min=2e-5, warmup_epochs=0.5), tmp_path)
    per = t.steps_per_epoch
    assert per >= 2
    lrs = []
    for step in range(2 * per):
        t.step = step
        lrs.append(t._lr())
    warm = 0.5 * per
    assert lrs[0] == pytest.approx(1e-3 / warm) and lrs[math.ceil(warm) - 1] <= 1e-3
    assert lrs[per - 1] == pytest.approx(1e-3)  # after warmup, before the step
    assert lrs[per] == pytest.approx(1e-4)  # after epoch 1: × 0.1
    t2 = Trainer(_cfg(cache, schedule="step", step_at=[1], step_gamma=0.01, lr_min=2e-5), tmp_path / "floor")
    t2.step = t2.steps_per_epoch
    assert t2._lr() == pytest.approx(2e-5)  # 1e-5 would be below the floor


def test_cosine_horizon_does_not_jump_when_epochs_grow(cache: Path, tmp_path: Path) -> None:
    """A run started for 2 epochs and continued to 4 (a new top rung) keeps its 2-epoch cosine: the rate reaches
    the floor at epoch 2 and stays there, never rising again."""
    cfg = _cfg(cache, epochs=2, schedule="cosine", lr_min=1e-5)
    first = Trainer(cfg, tmp_path).fit()
    assert first[-1]["lr"] == pytest.approx(1e-5)
    longer = Trainer(_cfg(cache, epochs=4, schedule="cosine", lr_min=1e-5), tmp_path)
    assert longer.horizon == 2
    history = longer.fit()
    lrs = [h["lr"] for h in history]
    assert lrs[:2] == [h["lr"] for h in first] and lrs[2:] == pytest.approx([1e-5, 1e-5])
    fresh = Trainer(_cfg(cache, epochs=4, schedule="cosine", lr_min=1e-5), tmp_path / "fresh")
    assert fresh.horizon == 4 and fresh.fit()[1]["lr"] > 1e-4  # a 4-epoch run from the start is mid-cosine


def test_adamw_does_not_decay_biases_and_norms(cache: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache, optimizer="adamw", weight_decay=0.05), tmp_path)
    decayed, plain = t.optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    norms = {id(m.weight) for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert norms and norms <= {id(p) for p in plain["params"]}
    every = Trainer(_cfg(cache, optimizer="adamw", weight_decay=0.05, decay_norm_and_bias=True), tmp_path / "all")
    assert [g["weight_decay"] for g in every.optimizer.param_groups] == [0.05]


STAGES = [
    {"epochs": 2, "crop": 32, "crops_per_tile": 2, "lr": 1e-3},
    {"lr": 3e-4, "augment": None, "schedule": "cosine", "batch_size": 2},
]


def test_two_stages_resumed_mid_stage_end_equal_to_an_uninterrupted_run(cache: Path, tmp_path: Path) -> None:
    cfg = _cfg(cache, epochs=4, stages=STAGES)
    assert [(s.start, s.end) for s in cfg.plan()] == [(0, 2), (2, 4)]
    straight = Trainer(cfg, tmp_path / "straight")
    history = straight.fit()
    assert [h["stage"] for h in history] == [1, 1, 2, 2]
    assert history[1]["lr"] == pytest.approx(1e-3) and history[3]["lr"] == pytest.approx(0.0, abs=1e-12)
    for cut in (1, 3):  # mid-stage 1, and mid-stage 2 (after the boundary)
        Trainer(cfg, tmp_path / f"cut{cut}").fit(cut)
        resumed = Trainer(cfg, tmp_path / f"cut{cut}")
        assert resumed.stage.index == (0 if cut == 1 else 1) and resumed.epoch == cut
        resumed.fit()
        a, b = _weights(straight), _weights(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed after epoch {cut} differs"
        assert [h["train/total"] for h in resumed.history] == [h["train/total"] for h in history]


def test_stage_configs_are_checked(cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"stages\[0\]` cannot change \['model'\]"):
        _cfg(cache, stages=[{"epochs": 1, "model": TINY}, {}]).validate()
    with pytest.raises(ConfigError, match=r"stages\[0\]` needs `epochs`"):
        _cfg(cache, stages=[{"lr": 1e-4}, {"epochs": 2}]).validate()
    with pytest.raises(ConfigError, match="add up to 5 epochs but `epochs` is 4"):
        _cfg(cache, epochs=4, stages=[{"epochs": 2}, {"epochs": 3}]).validate()
    with pytest.raises(ConfigError, match=r"`lr_min` is 1\.0"):
        _cfg(cache, epochs=2, stages=[{"epochs": 1}, {"lr_min": 1.0}]).validate()
    summed = TrainConfig.from_dict({"cache": str(cache), "stages": [{"epochs": 3}, {"epochs": 5, "lr": 3e-5}]})
    assert summed.epochs == 8 and summed.plan()[1].cfg.lr == 3e-5


def test_init_from_takes_the_weights_only(cache: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    source = load_checkpoint(checkpoint_dir / "best.pt")
    cfg = _cfg(cache, model={"encoder": "tu-test_resnet"}, init_from=str(checkpoint_dir), epochs=1)
    t = Trainer(cfg, tmp_path)
    assert t.epoch == 0 and t.step == 0 and not t.optimizer.state  # a fresh optimizer, step and schedule
    assert all(torch.equal(v, source["model"][k]) for k, v in t.model.state_dict().items())
    assert Trainer(_cfg(cache, init_from=str(checkpoint_dir / "last.pt"), epochs=1), tmp_path / "b").epoch == 0
    other = _cfg(cache, model={"encoder": "tu-test_resnet", "head_channels": 8}, init_from=str(checkpoint_dir))
    with pytest.raises(ConfigError, match="its weights do not fit this model"):
        Trainer(other, tmp_path / "c")
    with pytest.raises(ConfigError, match="no such checkpoint"):
        Trainer(_cfg(cache, init_from=str(tmp_path / "nowhere")), tmp_path / "d")


def test_top_k_keeps_the_best_epochs(cache: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache, epochs=4, top_k=2), tmp_path)
    history = t.fit()
    ranked = sorted(range(4), key=lambda e: (-history[e]["score"], e))[:2]
    kept = sorted(p.name for p in tmp_path.glob("top-*.pt"))
    assert kept == sorted(f"top-{e + 1:04d}.pt" for e in ranked)
    assert [p.name for p in t.top_checkpoints()] == [f"top-{e + 1:04d}.pt" for e in ranked]
    listed = json.loads((tmp_path / "top.json").read_text())
    assert [d["file"] for d in listed] == [p.name for p in t.top_checkpoints()]
    assert [d["score"] for d in listed] == [history[e]["score"] for e in ranked]
    best = load_checkpoint(tmp_path / "best.pt")
    top1 = load_checkpoint(t.top_checkpoints()[0])
    assert all(torch.equal(best["model"][k], top1["model"][k]) for k in best["model"])
    # A top file that last.pt does not list (written just before a crash) is removed when the run resumes.
    save_checkpoint(tmp_path / "top-0099.pt", {"model": {}})
    Trainer(_cfg(cache, epochs=4, top_k=2), tmp_path)
    assert not (tmp_path / "top-0099.pt").exists() and len(list(tmp_path.glob("top-*.pt"))) == 2


def test_val_every_validates_on_schedule_and_at_the_end(cache: Path, tmp_path: Path) -> None:
    history = Trainer(_cfg(cache, epochs=3, val_every=2, val_batch_size=3), tmp_path).fit()
    assert ["score" in h for h in history] == [False, True, True]


def test_an_fp16_overflow_is_retried_once_in_full_precision(cache: Path, tmp_path: Path) -> None:
    """On the CPU bf16 is not native, so the retry trains in fp32, from the last checkpoint; a non-finite loss
    outside fp16 is the run's own and is not retried."""
    seen: list[dict[str, float]] = []
    trainers: list[Trainer] = []
    cfg = _cfg(cache, epochs=3, amp="fp16")
    final = fit_with_retries(
        cfg, tmp_path, lambda m, _: seen.append(m), faults={"nonfinite_at_epoch": 1}, trainers=trainers
    )
    assert len(trainers) == 2 and trainers[0].amp_dtype == torch.float16 and final.amp_dtype is None
    assert [int(m["epoch"]) for m in seen] == [1, 2, 3]  # epoch 2 failed once and ran again
    assert "nan_retry" not in seen[0] and seen[1]["nan_retry"] == 1.0 and seen[2]["amp_bits"] == 32.0
    assert load_checkpoint(tmp_path / LAST)["config"]["amp"] == "off"
    with pytest.raises(NonFiniteLoss):  # bf16 (or fp32) runs are not rescued, and no fault fires outside fp16
        Trainer(_cfg(cache, epochs=1, amp="fp16"), tmp_path / "x", faults={"nonfinite_at_epoch": 0}).fit()


def test_a_non_finite_loss_survives_the_copy_and_pickle_ray_puts_it_through() -> None:
    import copy
    import pickle

    error = NonFiniteLoss("non-finite loss at epoch 1", fp16=True)
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert isinstance(clone, NonFiniteLoss) and str(clone) == str(error) and clone.fp16 is True


def test_auto_precision_is_native_only() -> None:
    cpu = torch.device("cpu")
    assert not native_bf16(cpu) and resolve_amp("auto", cpu) is None
    assert resolve_amp("fp16", cpu) == torch.float16 and resolve_amp("bf16", cpu) == torch.bfloat16


def test_the_winners_recipe_is_a_valid_two_stage_config() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = TrainConfig.from_yaml(root / "sweeps" / "configs" / "train-winners.yaml")
    cfg.validate_values()
    first, second = cfg.plan()
    assert (first.start, first.end, second.end) == (0, 100, 175) and cfg.epochs == 175
    assert (first.cfg.crop, first.cfg.crops_per_tile, second.cfg.crop, second.cfg.lr) == (896, 4, 1792, 3e-5)
    assert first.cfg.augment is not None and first.cfg.augment.photometric is not None and second.cfg.augment is None
    assert first.cfg.loss.weights()["r2_agl"] > 0 and cfg.top_k == 3 and cfg.optimizer == "adamw"


def test_a_trial_with_top_k_checkpoints_is_one_ensemble_member_averaging_them(cache: Path, tmp_path: Path) -> None:
    from geopose_ray.engine.predict import predict_batch
    from geopose_ray.ensemble.infer import AveragedRunner, Runner, fold_runner
    from geopose_ray.ensemble.members import check_members, find_members
    from geopose_ray.geometry import direction_to_angle

    run = tmp_path / "trial" / "checkpoint_000003"
    cfg = _cfg(cache, epochs=3, top_k=2)
    Trainer(cfg, run).fit()
    record = {"key": "a", "stage": "screen", "cfg": cfg.to_dict(), "metrics": {}, "checkpoint": str(run)}
    (tmp_path / "trials.json").write_text(json.dumps({"sweep": "s", "finalists": ["a"], "trials": {"a": record}}))
    (member,) = find_members(tmp_path)
    (fold,) = member.folds
    listed = [d["file"] for d in json.loads((run / "top.json").read_text())]
    assert fold.checkpoint.endswith("best.pt") and [Path(c).name for c in fold.extra] == listed[1:]
    assert set(check_members([member], downsample=2)) == {"a"}
    runner = fold_runner(fold, torch.device("cpu"), "off", 2)
    assert isinstance(runner, AveragedRunner) and len(runner.runners) == 2
    image = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    args = (torch.ones(1), torch.zeros(1, dtype=torch.long))
    agl, scale, angle = runner(image, *args)
    singles = [Runner(c, torch.device("cpu"), "off") for c in fold.checkpoints]
    outs = [predict_batch(r.model, image, *args) for r in singles]
    np.testing.assert_allclose(agl, (outs[0][0] + outs[1][0]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, (outs[0][1] + outs[1][1]) / 2, rtol=1e-6)
    expected = direction_to_angle(np.sin(outs[0][2]) + np.sin(outs[1][2]), np.cos(outs[0][2]) + np.cos(outs[1][2]))
    np.testing.assert_allclose(np.cos(angle - expected), 1.0, atol=1e-9)
    assert not np.allclose(outs[0][0], outs[1][0])  # two different epochs' weights

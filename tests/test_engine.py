"""The training engine: accumulation, exact resume, checkpoints, failures, validation and config checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from geopose_ray.engine import TrainConfig, Trainer, TrainingError
from geopose_ray.engine import trainer as trainer_module
from geopose_ray.engine.checkpoint import load_checkpoint, save_checkpoint
from geopose_ray.engine.trainer import batch_sizes
from geopose_ray.errors import ConfigError, DataError
from geopose_ray.losses import geopose_loss
from geopose_ray.metrics import score_report

TINY = {"encoder": "tu-test_resnet", "dropout": 0.5}


class NoNorm(nn.Module):
    """A small fully convolutional geopose model without batch-norm statistics or dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.agl = nn.Conv2d(8, 1, 3, padding=1)
        self.mag = nn.Conv2d(8, 1, 3, padding=1)
        self.xy = nn.Linear(8, 2)

    def forward(self, image: torch.Tensor, gsd: Any = None, city: Any = None) -> dict[str, torch.Tensor]:
        f = self.body(image.float() / 255)
        agl, mag = self.agl(f), self.mag(f)
        scale = (agl * mag).sum(dim=(1, 2, 3)) / ((agl * agl).sum(dim=(1, 2, 3)) + 0.01)
        return {"agl": agl, "mag": mag, "xy": self.xy(f.mean(dim=(2, 3))), "scale": scale}


def _cfg(cache_dir: Path, **over: Any) -> TrainConfig:
    base: dict[str, Any] = {"cache": str(cache_dir), "model": TINY, "epochs": 2, "batch_size": 4, "lr": 1e-3}
    return TrainConfig.from_dict({**base, **over})


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_batch_sizes_cover_the_epoch() -> None:
    assert batch_sizes(10, 4) == [4, 4, 2] and batch_sizes(8, 4) == [4, 4] and batch_sizes(3, 4) == [3]


def test_batch_4x1_equals_batch_1x4_tail_included(cache: Path, tmp_path: Path) -> None:
    """True accumulation: 4 micro-batches of 1 give the update of one batch of 4. The training split has 12
    tiles here, so with 4 per step the tail is a full step; a 5-sample step size makes a tail of 2."""
    for big, steps in ((4, 4), (5, 5)):
        torch.manual_seed(0)
        a = Trainer(
            _cfg(cache, batch_size=big, accumulation=1, epochs=1, augment=None), tmp_path / f"a{big}", model=NoNorm()
        )
        torch.manual_seed(0)
        b = Trainer(
            _cfg(cache, batch_size=1, accumulation=steps, epochs=1, augment=None), tmp_path / f"b{big}", model=NoNorm()
        )
        assert all(torch.equal(x, y) for x, y in zip(_weights(a).values(), _weights(b).values(), strict=True))
        a.fit()
        b.fit()
        assert a.step == b.step == math.ceil(len(a.train_set) / big)
        for (name, x), y in zip(_weights(a).items(), _weights(b).values(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulation_really_accumulates(cache: Path, tmp_path: Path) -> None:
    """The seed's bug (zeroing gradients every micro-batch) would make 1 x 4 the same as 1 x 1 with 4x fewer
    steps; here they differ in step count and weights."""
    torch.manual_seed(0)
    one = Trainer(_cfg(cache, batch_size=1, accumulation=1, epochs=1, augment=None), tmp_path / "one", model=NoNorm())
    torch.manual_seed(0)
    four = Trainer(_cfg(cache, batch_size=1, accumulation=4, epochs=1, augment=None), tmp_path / "four", model=NoNorm())
    one.fit()
    four.fit()
    assert one.step == 4 * four.step
    assert not torch.allclose(one.model.agl.weight, four.model.agl.weight)


def test_resume_reproduces_an_uninterrupted_run_exactly(cache: Path, tmp_path: Path) -> None:
    """4 epochs straight == 2 epochs, a new process-like Trainer resuming from last.pt, 2 more: identical
    weights, with dropout, batch-norm and augmentation all drawing random numbers."""
    cfg = _cfg(cache, epochs=4, augment={"rot90": True, "flip": True, "rotate_deg": 20.0, "zoom": [0.9, 1.1]})
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    first = Trainer(cfg, tmp_path / "split")
    first.fit(2)
    torch.manual_seed(12345)  # whatever the global RNG holds now must not matter
    resumed = Trainer(cfg, tmp_path / "split")
    assert resumed.epoch == 2
    resumed.fit()
    for (name, x), y in zip(_weights(straight).items(), _weights(resumed).values(), strict=True):
        assert torch.equal(x, y), name
    assert [h["score"] for h in straight.history] == [h["score"] for h in resumed.history]


def test_checkpoint_contents_and_weights_only_loading(cache: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache, epochs=1), tmp_path)
    t.fit()
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "rng", "epoch", "step", "best_score", "history", "config"} <= set(raw)
    assert raw["epoch"] == 1 and raw["config"]["model"]["encoder"] == "tu-test_resnet"
    assert (tmp_path / "best.pt").exists()
    assert TrainConfig.from_dict(raw["config"]) == t.cfg


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"epoch": 1})

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "c.pt", {"epoch": 2, "bad": Unpicklable()})
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"junk\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


class Explodes(NoNorm):
    """Returns NaN heights from the third call on."""

    calls = 0

    def forward(self, image: torch.Tensor, gsd: Any = None, city: Any = None) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        Explodes.calls += 1
        if Explodes.calls >= 3:
            out["agl"] = out["agl"] * float("nan")
        return out


def test_non_finite_loss_stops_with_epoch_and_step(cache: Path, tmp_path: Path) -> None:
    Explodes.calls = 0
    t = Trainer(_cfg(cache, batch_size=2, augment=None), tmp_path, model=Explodes())
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, step 3 \(total nan, agl nan"):
        t.fit()
    assert not (tmp_path / "last.pt").exists()  # nothing half-written


class GlitchesOnce(NoNorm):
    """Returns NaN heights at the second call only: one bad micro-batch among finite ones."""

    calls = 0

    def forward(self, image: torch.Tensor, gsd: Any = None, city: Any = None) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        GlitchesOnce.calls += 1
        if GlitchesOnce.calls == 2:
            out["agl"] = out["agl"] * float("nan")
        return out


@pytest.mark.parametrize("check_every", [1, 3, 32])
def test_a_non_finite_loss_between_checks_is_still_caught_and_named(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check_every: int
) -> None:
    """The losses are read back every CHECK_EVERY micro-batches, not every step: a bad step before the last
    one of a check's window must still stop the run, named by its own step."""
    monkeypatch.setattr(trainer_module, "CHECK_EVERY", check_every)
    GlitchesOnce.calls = 0
    t = Trainer(_cfg(cache, batch_size=2, augment=None), tmp_path, model=GlitchesOnce())
    assert len(batch_sizes(len(t.train_set), 2)) > 3  # the bad step is neither the first nor the last
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, step 2 \(total nan, agl nan"):
        t.fit()
    assert not (tmp_path / "last.pt").exists()


def test_the_error_names_the_learning_rate_of_the_bad_step(cache: Path, tmp_path: Path) -> None:
    """The check runs at the end of the epoch here; the rate it names is the one the bad step trained with."""
    GlitchesOnce.calls = 0
    cfg = _cfg(cache, batch_size=2, augment=None, epochs=1, schedule="cosine")
    t = Trainer(cfg, tmp_path, model=GlitchesOnce())
    total = t.steps_per_epoch
    assert total > 3
    at_step_2 = 1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / total))  # one optimizer step taken before it
    with pytest.raises(TrainingError, match=rf"step 2 .*\(now {at_step_2:.3g}\)"):
        t.fit()


def test_train_losses_are_the_sample_weighted_means_of_the_steps(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-loss sums stay on the device during the epoch; what they report is Σ n·loss / Σ n over the
    micro-batches, the short last one included."""
    steps: list[tuple[int, dict[str, float]]] = []

    def recording(pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], cfg: Any, **kw: Any) -> Any:
        losses = geopose_loss(pred, batch, cfg, **kw)
        steps.append((int(batch["image"].shape[0]), {k: float(v.detach()) for k, v in losses.items()}))
        return losses

    monkeypatch.setattr(trainer_module, "geopose_loss", recording)
    t = Trainer(_cfg(cache, epochs=1, batch_size=3, val_fold=None), tmp_path, model=NoNorm())
    metrics = t.fit()[-1]
    sizes = [n for n, _ in steps]
    assert sizes == batch_sizes(len(t.train_set), 3) and sizes[-1] < 3
    for k in ("total", "agl", "mag", "xy", "scale"):
        expected = sum(n * losses[k] for n, losses in steps) / sum(sizes)
        assert metrics[f"train/{k}"] == pytest.approx(expected, rel=1e-5)


def test_validation_score_is_the_challenge_score(cache: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache, epochs=1), tmp_path)
    metrics, stats = t.validate()
    assert len(stats) == len(t.val_set) > 0
    report = score_report(stats)
    assert metrics["score"] == report.score
    assert {f"score/{c}" for c in report.cities} <= set(metrics)
    assert all(np.isfinite(s.angle_err) for s in stats)


def test_cosine_schedule_and_metrics(cache: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache, epochs=2, schedule="cosine", grad_clip=1.0), tmp_path)
    history = t.fit()
    assert history[0]["lr"] < 1e-3 and history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert {"train/total", "train/agl", "train/mag", "train/xy", "train/scale", "val/total", "score",
            "images_per_s", "peak_mem_mb", "best_score", "score_avg"} <= set(history[-1])  # fmt: skip
    assert history[-1]["images_per_s"] > 0 and history[-1]["peak_mem_mb"] > 0


def test_score_avg_is_the_mean_of_the_last_epochs_across_a_resume(cache: Path, tmp_path: Path) -> None:
    """With score_window 1 every epoch is in the window, also the ones trained before a restart; with the default
    (5 % of the epochs) three epochs average only the last."""
    Trainer(_cfg(cache, epochs=2, score_window=1.0), tmp_path).fit()
    history = Trainer(_cfg(cache, epochs=3, score_window=1.0), tmp_path).fit()  # resumes from last.pt
    scores = [h["score"] for h in history]
    assert len(scores) == 3 and len(set(scores)) == 3
    assert [h["score_avg"] for h in history] == pytest.approx([np.mean(scores[:k]) for k in (1, 2, 3)])
    default = Trainer(_cfg(cache, epochs=3), tmp_path / "default").fit()
    assert [h["score_avg"] for h in default] == [h["score"] for h in default]


def test_bf16_autocast_runs_on_cpu(cache: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache, epochs=1, amp="bf16"), tmp_path)
    assert t.amp_dtype == torch.bfloat16
    assert math.isfinite(t.fit()[-1]["train/total"])
    assert Trainer(_cfg(cache, epochs=1), tmp_path / "auto").amp_dtype is None  # auto: off on the CPU


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"lr": 0}, "`lr` is 0, but must be `lr > 0`"),
        ({"accumulation": 0}, "`accumulation >= 1`"),
        ({"optimizer": "sgd"}, r"must be in \('adam', 'adamw'\)"),
        ({"amp": "fp8"}, "`amp` is 'fp8'"),
        ({"score_window": 1.5}, r"`score_window` is 1.5, but must be a share of the epochs in \[0, 1\]"),
        ({"lrr": 1}, r"unknown key\(s\) \['lrr'\] in `train`; valid keys: \['cache'"),
        ({"model": {"encoder": "resnet18", "decoderr": "Unet"}}, r"unknown key\(s\) \['decoderr'\] in `model`"),
        ({"cache": "/nonexistent"}, "is not a training cache; run geopose-ray prepare"),
        ({"val_fold": 7}, r"`val_fold` is 7, but the cache's folds are \[0, 1, 2, 3\]"),
    ],
)
def test_bad_config_values_are_named(cache: Path, tmp_path: Path, over: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(_cfg(cache, **over), tmp_path)

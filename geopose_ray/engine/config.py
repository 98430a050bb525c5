"""One training run's configuration: frozen dataclasses built from a dict (YAML), validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geopose_ray.data.augment import AugmentConfig
from geopose_ray.errors import ConfigError
from geopose_ray.losses import LossWeights
from geopose_ray.metrics import SCORE_WINDOW
from geopose_ray.models.config import ModelConfig

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
AMP_MODES = ("auto", "off", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """A training run."""

    cache: str  # the training cache directory (geopose-ray prepare)
    val_fold: int | None = 0  # the fold held out for validation; None trains on every fold
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None = no augmentation
    epochs: int = 20
    batch_size: int = 4  # samples per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step: effective batch = batch_size × accumulation
    lr: float = 1e-4
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (per optimizer step, down to 0 at the last epoch)
    grad_clip: float | None = None  # max gradient norm; None = no clipping
    amp: str = "auto"  # auto (fp16 on CUDA, off on CPU) | off | fp16 (with a grad scaler) | bf16
    channels_last: bool = True  # measured faster on CPU (1.3x) and the usual choice with AMP on GPUs
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0  # data-loader worker processes
    bad_tiles: str = "skip"  # a tile that cannot be read: skip (counted, warned, replaced) | fail (stop at once)
    seed: int = 0
    # score_avg: the mean score of the last max(1, round(score_window × epoch)) epochs (10 of 200 by default; the
    # plain score at a 20-epoch rung). The results table ranks trials at the same epoch by it.
    score_window: float = SCORE_WINDOW

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation

    def validate(self) -> None:
        """Check every value; raises ConfigError naming the field, the value and what is allowed."""
        checks: list[tuple[bool, str]] = [
            (self.epochs >= 1, f"The value of `epochs` is {self.epochs}, but must be `epochs >= 1`"),
            (self.batch_size >= 1, f"The value of `batch_size` is {self.batch_size}, but must be `batch_size >= 1`"),
            (
                self.accumulation >= 1,
                f"The value of `accumulation` is {self.accumulation}, but must be `accumulation >= 1`",
            ),
            (math.isfinite(self.lr) and self.lr > 0, f"The value of `lr` is {self.lr}, but must be `lr > 0`"),
            (self.weight_decay >= 0, f"The value of `weight_decay` is {self.weight_decay}, but must be `>= 0`"),
            (self.optimizer in OPTIMIZERS, f"The value of `optimizer` is {self.optimizer!r}, must be in {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"The value of `schedule` is {self.schedule!r}, must be in {SCHEDULES}"),
            (self.amp in AMP_MODES, f"The value of `amp` is {self.amp!r}, must be in {AMP_MODES}"),
            (self.device in DEVICES, f"The value of `device` is {self.device!r}, must be in {DEVICES}"),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"The value of `grad_clip` is {self.grad_clip}, but must be `grad_clip > 0` or null",
            ),
            (
                0 <= self.score_window <= 1,
                f"The value of `score_window` is {self.score_window}, but must be a share of the epochs in [0, 1]",
            ),
            (self.num_workers >= 0, f"The value of `num_workers` is {self.num_workers}, but must be `>= 0`"),
            (
                self.bad_tiles in ("skip", "fail"),
                f"The value of `bad_tiles` is {self.bad_tiles!r}, but must be 'skip' or 'fail'",
            ),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if not Path(self.cache, "cache.json").exists():
            raise ConfigError(f"`cache` {self.cache!r} is not a training cache; run geopose-ray prepare first")

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, not tuples): fit for YAML, JSON and ``torch.load(weights_only=True)``."""
        return _plain(dataclasses.asdict(self))

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> TrainConfig:
        """Build from nested dicts (as read from YAML); unknown keys are errors listing the valid ones."""
        raw = dict(raw)
        nested: dict[str, Any] = {}
        for name, cls in (("model", ModelConfig), ("loss", LossWeights), ("augment", AugmentConfig)):
            if name in raw:
                value = raw.pop(name)
                if value is None and name == "augment":
                    nested[name] = None
                else:
                    nested[name] = _build(cls, value or {}, name)
        return _build(TrainConfig, {**raw, **nested}, "train")

    @staticmethod
    def from_yaml(path: str | Path) -> TrainConfig:
        return TrainConfig.from_dict(read_yaml_mapping(path, "training config"))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: {what} not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} keys")
    return raw


def _build(cls: Any, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"`{where}` must be a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in `{where}`; valid keys: {names}")
    if "zoom" in values and isinstance(values["zoom"], list):
        values = {**values, "zoom": tuple(values["zoom"])}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"`{where}`: {e}") from e


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value

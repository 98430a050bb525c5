"""One training run's configuration: frozen dataclasses built from a dict (YAML), validated once."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
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
SCHEDULES = ("constant", "cosine", "step")
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
    epochs: int = 20  # in all; with `stages`, the last stage runs to here
    batch_size: int = 4  # samples per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step: effective batch = batch_size × accumulation
    # Random crops of the cached tiles, taken before augmentation and read from the memory-mapped cache without
    # loading the rest of the tile. None = whole tiles.
    crop: int | None = None  # side in pixels at the cache's resolution
    crops_per_tile: int = 1  # crops drawn from each training tile per epoch
    # Random-sized crops: a square of side crop × u, u uniform in this range, resized to crop (flow lengths, hence
    # magnitude and scale, scale by 1/u; heights do not). (1, 1) = plain crops.
    crop_scale: tuple[float, float] = (1.0, 1.0)
    lr: float = 1e-4
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # apply weight decay to biases and normalisation parameters too
    # constant | cosine (per optimizer step, from lr down to lr_min at the horizon) | step (× step_gamma at
    # each epoch of step_at); every schedule starts with warmup_epochs of linear warmup.
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    lr_min: float = 0.0  # the floor of cosine and step decay
    # The cosine horizon in epochs; None = the epochs the run (or stage) was started with. The horizon is kept
    # in the checkpoint, so raising `epochs` later (a new top rung) continues at the floor instead of sending
    # the rate back up mid-run.
    schedule_epochs: int | None = None
    step_at: tuple[int, ...] = ()  # epochs (of the run or stage) after which step decay multiplies by step_gamma
    step_gamma: float = 0.1
    grad_clip: float | None = None  # max gradient norm; None = no clipping
    # auto: on CUDA bf16 where the GPU computes it natively (compute capability 8.0 and newer), else fp16 with
    # a grad scaler; off on the CPU | off | fp16 | bf16. A run whose fp16 loss turns non-finite is retried once
    # from its last checkpoint in bf16 where native, else in full precision (tagged nan_retry).
    amp: str = "auto"
    channels_last: bool = True  # measured faster on CPU (1.3x) and the usual choice with AMP on GPUs
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0  # data-loader worker processes
    bad_tiles: str = "skip"  # a tile that cannot be read: skip (counted, warned, replaced) | fail (stop at once)
    seed: int = 0
    # score_avg: the mean score of the last max(1, round(score_window × epoch)) epochs (10 of 200 by default; the
    # plain score at a 20-epoch rung). The results table ranks trials at the same epoch by it.
    score_window: float = SCORE_WINDOW
    val_batch_size: int | None = None  # whole validation tiles per batch; None = batch_size
    val_every: int = 1  # validate every this many epochs (and always at the last)
    top_k: int = 1  # keep the k best checkpoints by validation score (top-*.pt); the ensemble averages them
    # Warm start: the weights of a checkpoint (a .pt file, or a run or trial directory holding best.pt or
    # last.pt; local or on the sweep's storage), with a fresh optimizer, step and schedule. Used only when the
    # run starts; a resumed run continues from its own checkpoint.
    init_from: str | None = None
    # Stages of one run, in order: each a mapping of the keys in STAGE_KEYS that differ from the run's, with its
    # `epochs` (the last may leave it out to run to `epochs`). Each stage starts a fresh optimizer and schedule
    # from the weights the last one ended with; a run resumes exactly mid-stage.
    stages: tuple[dict[str, Any], ...] = ()

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation

    def validate(self) -> None:
        """Check every value and that the cache exists; raises ConfigError naming the field, the value and what
        is allowed."""
        self.validate_values()
        if not Path(self.cache, "cache.json").exists():
            raise ConfigError(f"`cache` {self.cache!r} is not a training cache; run geopose-ray prepare first")

    def validate_values(self) -> None:
        """Check every value (the cache is not opened)."""
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
            (
                self.crop is None or self.crop >= 32,
                f"The value of `crop` is {self.crop}, but must be a side in pixels (>= 32) or null for whole tiles",
            ),
            (
                self.crops_per_tile >= 1,
                f"The value of `crops_per_tile` is {self.crops_per_tile}, but must be `crops_per_tile >= 1`",
            ),
            (
                len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1],
                f"The value of `crop_scale` is {list(self.crop_scale)}, but must be [low, high] with 0 < low <= high",
            ),
            (
                self.crop is not None or (self.crops_per_tile == 1 and tuple(self.crop_scale) == (1.0, 1.0)),
                "`crops_per_tile` and `crop_scale` need `crop` (a crop side in pixels)",
            ),
            (
                self.warmup_epochs >= 0,
                f"The value of `warmup_epochs` is {self.warmup_epochs}, but must be `warmup_epochs >= 0`",
            ),
            (
                math.isfinite(self.lr_min) and 0 <= self.lr_min <= self.lr,
                f"The value of `lr_min` is {self.lr_min}, but must be `0 <= lr_min <= lr` ({self.lr})",
            ),
            (
                self.schedule_epochs is None or self.schedule_epochs >= 1,
                f"The value of `schedule_epochs` is {self.schedule_epochs}, but must be `>= 1` or null",
            ),
            (
                all(isinstance(e, int) and e >= 1 for e in self.step_at) and list(self.step_at) == sorted(self.step_at),
                f"The value of `step_at` is {list(self.step_at)}, but must be increasing epochs >= 1",
            ),
            (
                0 < self.step_gamma <= 1,
                f"The value of `step_gamma` is {self.step_gamma}, but must be `0 < step_gamma <= 1`",
            ),
            (
                self.val_batch_size is None or self.val_batch_size >= 1,
                f"The value of `val_batch_size` is {self.val_batch_size}, but must be `>= 1` or null",
            ),
            (self.val_every >= 1, f"The value of `val_every` is {self.val_every}, but must be `val_every >= 1`"),
            (self.top_k >= 1, f"The value of `top_k` is {self.top_k}, but must be `top_k >= 1`"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.stages:
            self.plan()  # checks every stage

    def plan(self) -> list[Stage]:
        """The run's stages with their epochs: one stage of the whole run when ``stages`` is empty."""
        if not self.stages:
            return [Stage(0, 0, self.epochs, self)]
        out: list[Stage] = []
        start = 0
        for i, raw in enumerate(self.stages):
            where = f"stages[{i}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"`{where}` must be a mapping of training keys, got {raw!r}")
            unknown = sorted(set(raw) - set(STAGE_KEYS) - {"epochs"})
            if unknown:
                raise ConfigError(f"`{where}` cannot change {unknown}; a stage may set epochs and {list(STAGE_KEYS)}")
            last = i == len(self.stages) - 1
            length = raw.get("epochs")
            if length is None and not last:
                raise ConfigError(f"`{where}` needs `epochs` (only the last stage may run to the run's `epochs`)")
            end = self.epochs if length is None else start + _int(length, f"{where}.epochs")
            if end <= start or (length is not None and int(length) < 1):
                raise ConfigError(
                    f"`{where}` would run epochs {start + 1}..{end}: every stage needs >= 1 epoch within `epochs` "
                    f"({self.epochs})"
                )
            if last and end != self.epochs:
                raise ConfigError(
                    f"the stages add up to {end} epochs but `epochs` is {self.epochs}; make them agree or leave out "
                    "the last stage's epochs"
                )
            overrides = {k: v for k, v in raw.items() if k != "epochs"}
            merged = {**self.to_dict(), "stages": [], **_stage_overrides(self, overrides, where)}
            stage_cfg = TrainConfig.from_dict(merged)
            stage_cfg.validate_values()
            out.append(Stage(i, start, end, stage_cfg))
            start = end
        return out

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
        stages = raw.get("stages")
        if stages:
            if not isinstance(stages, list | tuple):
                raise ConfigError(f"`stages` must be a list of mappings, got {stages!r}")
            raw["stages"] = tuple(dict(st) if isinstance(st, dict) else st for st in stages)
            lengths = [st.get("epochs") if isinstance(st, dict) else None for st in stages]
            if "epochs" not in raw and all(e is not None for e in lengths):
                raw["epochs"] = sum(_int(e, "stages[].epochs") for e in lengths)
        elif stages is not None:
            raw["stages"] = ()
        for key in ("crop_scale", "step_at"):
            if isinstance(raw.get(key), list):
                raw[key] = tuple(raw[key])
        return _build(TrainConfig, {**raw, **nested}, "train")

    @staticmethod
    def from_yaml(path: str | Path) -> TrainConfig:
        return TrainConfig.from_dict(read_yaml_mapping(path, "training config"))


# What a stage may change; the model, the data, the seed and the device are the run's.
STAGE_KEYS: tuple[str, ...] = (
    "batch_size", "accumulation", "crop", "crops_per_tile", "crop_scale", "lr", "optimizer", "weight_decay",
    "decay_norm_and_bias", "schedule", "warmup_epochs", "lr_min", "schedule_epochs", "step_at", "step_gamma",
    "grad_clip", "amp", "loss", "augment", "val_every", "val_batch_size",
)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One stage of a run: epochs [start, end) with its own configuration (the run's with the stage's keys)."""

    index: int
    start: int
    end: int
    cfg: TrainConfig


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"The value of `{where}` is {value!r}, but must be an integer")
    return value


def _stage_overrides(base: TrainConfig, overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """A stage's keys as plain values; a nested mapping (loss, augment) replaces the run's whole."""
    out = dict(overrides)
    for name in ("loss", "augment"):
        if name in out and out[name] is not None and not isinstance(out[name], dict):
            raise ConfigError(f"`{where}.{name}` must be a mapping or null, got {out[name]!r}")
    return out


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
    values = {k: _typed(v, _hints(cls).get(k), f"{where}.{k}" if where != "train" else k) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"`{where}`: {e}") from e


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """A scalar setting checked against its field's type: ``1e-3`` (a string to YAML 1.1) is the number it means;
    any other value of the wrong type is a ConfigError naming the key and the type. Other fields pass as they
    are (their own checks follow)."""
    allowed = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    scalars = allowed & set(_NAMES)
    if not scalars or (value is None and type(None) in allowed) or not (allowed - {type(None)} <= set(_NAMES)):
        return value
    if float in scalars and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = any(
        (isinstance(value, t) and (t is bool or not isinstance(value, bool)))
        or (t is float and isinstance(value, int) and not isinstance(value, bool))
        for t in scalars
    )
    if not ok:
        names = " or ".join(_NAMES[t] for t in (float, int, bool, str) if t in scalars)
        if type(None) in allowed:
            names += " (or null)"
        raise ConfigError(f"The value of `{key}` is {value!r}, but must be {names}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value

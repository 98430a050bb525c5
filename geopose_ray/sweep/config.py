"""A sweep's configuration: the data, the grid, the promoter's rungs, resources and budget; validated before
Ray starts, so a typo fails in seconds with the valid choices instead of after trials have started."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from geopose_ray.data.cache import TrainingCache
from geopose_ray.engine.config import TrainConfig, read_yaml_mapping
from geopose_ray.errors import ConfigError
from geopose_ray.jobdir import MLFLOW_INSTEAD, STORAGE_INSTEAD, mlflow_path, refuse_outputs_in_job_copy
from geopose_ray.models.config import ModelConfig, resolve_decoder, resolve_model
from geopose_ray.models.geopose import validate_model_config
from geopose_ray.storage import is_remote, join, redact
from geopose_ray.sweep.files import SweepFiles
from geopose_ray.sweep.promoter import check_schedule


@dataclass(frozen=True)
class GridConfig:
    """The screened grid: every combination is one trial."""

    encoders: list[str] = field(default_factory=lambda: ["resnet34"])
    decoders: list[str] = field(default_factory=lambda: ["Unet"])
    lrs: list[float] = field(default_factory=lambda: [1e-4])
    accumulation: list[int] = field(default_factory=lambda: [1])
    weights: dict[str, str | None] = field(default_factory=dict)  # per encoder; missing = `train.model.weights`
    batch_size: dict[str, int] = field(default_factory=dict)  # per encoder; missing = `train.batch_size`


@dataclass(frozen=True)
class SweepConfig:
    """One sweep."""

    name: str
    cache: str  # the training cache (geopose-ray prepare); must be readable on every node
    grid: GridConfig = field(default_factory=GridConfig)
    train: dict[str, Any] = field(default_factory=dict)  # the rest of every trial's TrainConfig
    rungs: list[int] = field(default_factory=lambda: [20, 60, 200])  # epochs; the last is the top rung
    eta: int = 3
    min_results: int = 1
    metric: str = "score"
    mode: str = "max"
    val_fold: int = 0  # screening validates on this fold; finalists then run every fold
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    storage_path: str = "runs"  # Ray Tune's storage (a local dir or s3://...); the sweep writes under it/name
    budget_gpu_hours: float | None = None
    tracking_uri: str | None = None  # MLflow; default sqlite:///<storage_path>/<name>/mlflow.db
    experiment: str | None = None  # MLflow experiment; default the sweep's name
    # grid: every combination, in the listed order; guided: every combination, in an order learnt from the first
    # rung's scores (sweep/order.py); optuna: TPE draws num_samples trials from the grid's axes
    search: str = "grid"
    num_samples: int = 16  # optuna: how many trials to draw
    lr_range: list[float] | None = None  # optuna: [low, high] log-uniform learning rate (else grid.lrs as choices)
    search_seed: int = 0  # guided, optuna: the searcher's seed
    pending_trials: int = 16  # guided, optuna: trials suggested ahead of free workers (what the autoscaler sees)
    # guided: a running fold run yields its worker to a waiting one of a costlier architecture (sweep/order.py)
    preempt_fold_runs: bool = True
    faults: dict[str, Any] = field(default_factory=dict)  # fault injection for reliability tests; leave empty

    @staticmethod
    def from_yaml(path: str | Path) -> SweepConfig:
        return SweepConfig.from_dict(read_yaml_mapping(path, "sweep config"))

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> SweepConfig:
        raw = dict(raw)
        names = [f.name for f in dataclasses.fields(SweepConfig)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in the sweep config; valid keys: {names}")
        grid = raw.pop("grid", {}) or {}
        grid_names = [f.name for f in dataclasses.fields(GridConfig)]
        bad = sorted(set(grid) - set(grid_names))
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in `grid`; valid keys: {grid_names}")
        try:
            return SweepConfig(grid=GridConfig(**grid), **raw)
        except TypeError as e:
            raise ConfigError(f"sweep config: {e}") from e

    @property
    def out_dir(self) -> Path:
        """The sweep's local directory (the MLflow database and artifacts on the embedded default, the ensemble's
        output): beside Tune's experiments for a local storage path; for cloud storage (s3://, gs://) under
        ``runs/`` in the driver's working directory, where it also keeps working copies of the sweep's files."""
        if is_remote(self.storage_path):
            return Path("runs") / self.name
        return Path(self.storage_path.removeprefix("file://")) / self.name

    @property
    def files(self) -> SweepFiles:
        """The sweep's own files (results table, promoter state, trial records): in ``<storage_path>/<name>/``,
        on the object store for cloud storage, where every later job and head finds them."""
        local = self.out_dir.resolve()
        if not is_remote(self.storage_path):
            return SweepFiles(str(local), local)
        # As Tune names its experiments: the name as it is, percent-escaped in the URI (pyarrow decodes it).
        return SweepFiles(join(self.storage_path, quote(self.name, safe="")), local)

    @property
    def mlflow_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{(self.out_dir / 'mlflow.db').resolve()}"

    def refuse_outputs_in_job_copy(self, *more: tuple[str, str | Path | None, str]) -> None:
        """Refuse a local storage path or MLflow store (its database and artifacts), and ``more`` outputs, in a
        Ray job's copy of its working directory (:mod:`geopose_ray.jobdir`), before anything is written.

        Raises:
            DataError: naming the output and what to give instead.
        """
        database = mlflow_path(self.mlflow_uri)
        local_mlflow = database is not None
        mlflow = "MLflow's database" if self.tracking_uri else "MLflow's default database (tracking_uri is not set)"
        artifacts_instead = (
            "Set tracking_uri to an MLflow server (`launch/local.sh start mlflow` prints it): a local MLflow store "
            "keeps its artifacts beside the sweep's local files."
        )
        refuse_outputs_in_job_copy(
            [
                ("storage_path", None if is_remote(self.storage_path) else self.storage_path.removeprefix("file://"),
                 STORAGE_INSTEAD),
                (mlflow, database, MLFLOW_INSTEAD),
                ("MLflow's artifact directory", self.out_dir / "mlartifacts" if local_mlflow else None,
                 artifacts_instead),
                *more,
            ]
        )  # fmt: skip

    def trial_config(self, encoder: str, decoder: str, lr: float, accumulation: int) -> dict[str, Any]:
        """One trial's TrainConfig dict (what a Ray Tune trial trains)."""
        g = self.grid
        model = {**self.train.get("model", {}), "encoder": encoder, "decoder": decoder}
        if encoder in g.weights:
            model["weights"] = g.weights[encoder]
        batch = g.batch_size.get(encoder, self.train.get("batch_size", TrainConfig.batch_size))
        cfg = {
            **self.train,
            # Trials run in their own working directories, on any node: a relative path would not resolve.
            "cache": self.cache if "://" in self.cache else str(Path(self.cache).resolve()),
            "val_fold": self.val_fold,
            "model": model,
            "lr": lr,
            "accumulation": accumulation,
            "batch_size": batch,
            "epochs": self.rungs[-1],
        }
        return TrainConfig.from_dict(cfg).to_dict()

    def trial_configs(self) -> list[dict[str, Any]]:
        """Every grid point as a plain TrainConfig dict (the grid search's trials)."""
        g = self.grid
        return [
            self.trial_config(enc, dec, lr, acc)
            for enc, dec, lr, acc in itertools.product(g.encoders, g.decoders, g.lrs, g.accumulation)
        ]

    @property
    def n_trials(self) -> int:
        g = self.grid
        if self.search == "optuna":
            return self.num_samples
        return len(g.encoders) * len(g.decoders) * len(g.lrs) * len(g.accumulation)

    def validate(self) -> list[str]:
        """Check everything that can be checked before Ray starts, section by section, cheapest first; the
        architectures are built on PyTorch's meta device, no weights are read and nothing is written.

        Returns:
            Notes, sorted and each once: resolved encoder names, credentials in the storage path.

        Raises:
            ConfigError: naming the first setting that is not valid, its value and what it must be.
        """
        self._check_names()
        self._check_data()
        self._check_grid()
        self._check_promoter()
        self._check_resources()
        self._check_search()
        return sorted(set(self._check_storage() + self._check_models()))

    def _check_names(self) -> None:
        """``name``: plain and non-empty; on an object store only letters, digits, ``.``, ``_`` and ``-``."""
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"The value of `name` is {self.name!r}: use a plain, non-empty name")
        if is_remote(self.storage_path) and not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ConfigError(
                f"The value of `name` is {self.name!r}: a sweep on an object store is named with letters, digits, "
                "'.', '_' and '-' only (Ray Tune cannot restore experiments under other names there)"
            )

    def _check_data(self) -> None:
        """``cache``: a training cache written by ``geopose-ray prepare`` (its ``cache.json`` exists)."""
        if not Path(self.cache, "cache.json").exists():
            raise ConfigError(f"`cache` {self.cache!r} is not a training cache; run geopose-ray prepare first")

    def _check_grid(self) -> None:
        """``grid``: every axis non-empty, learning rates finite and > 0, accumulation steps integers >= 1."""
        g = self.grid
        for key in ("encoders", "decoders", "lrs", "accumulation"):
            if not getattr(g, key):
                raise ConfigError(f"`grid.{key}` is empty; give at least one value")
        for lr in g.lrs:
            if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
                raise ConfigError(f"The value {lr!r} in `grid.lrs` is not valid: learning rates must be > 0")
        for steps in g.accumulation:
            if not (isinstance(steps, int) and steps >= 1):
                raise ConfigError(f"The value {steps!r} in `grid.accumulation` is not valid: steps must be >= 1")

    def _check_promoter(self) -> None:
        """``rungs``, ``eta``, ``mode``, ``min_results``, ``budget_gpu_hours``: integers where counts are meant, then
        the promoter's own check (:func:`~geopose_ray.sweep.promoter.check_schedule`)."""
        if not (isinstance(self.rungs, list | tuple) and all(_is_int(r) for r in self.rungs)):
            raise ConfigError(f"The value of `rungs` is {self.rungs!r}, but must be a list of integer epochs")
        for key in ("eta", "min_results"):
            if not _is_int(getattr(self, key)):
                raise ConfigError(f"The value of `{key}` is {getattr(self, key)!r}, but must be an integer")
        check_schedule(self.rungs, self.eta, self.mode, self.min_results, self.budget_gpu_hours)

    def _check_resources(self) -> None:
        """``cpus_per_trial`` > 0 and ``gpus_per_trial`` >= 0 (fractions share a device)."""
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(
                f"resources per trial ({self.cpus_per_trial} CPU, {self.gpus_per_trial} GPU) are impossible: "
                "cpus_per_trial must be > 0 and gpus_per_trial >= 0"
            )

    def _check_search(self) -> None:
        """``search`` and its settings: ``pending_trials`` >= 1, ``preempt_fold_runs`` a boolean, ``num_samples``
        >= 1 for optuna, ``lr_range`` ``[low, high]`` with 0 < low < high and only for optuna."""
        if self.search not in ("grid", "guided", "optuna"):
            raise ConfigError(f"The value of `search` is {self.search!r}, but must be 'grid', 'guided' or 'optuna'")
        if not (_is_int(self.pending_trials) and self.pending_trials >= 1):
            raise ConfigError(f"The value of `pending_trials` is {self.pending_trials!r}, but must be an integer >= 1")
        if not isinstance(self.preempt_fold_runs, bool):
            raise ConfigError(
                f"The value of `preempt_fold_runs` is {self.preempt_fold_runs!r}, but must be true or false"
            )
        if self.search == "optuna" and not (_is_int(self.num_samples) and self.num_samples >= 1):
            raise ConfigError(f"The value of `num_samples` is {self.num_samples!r}, but must be `num_samples >= 1`")
        if self.lr_range is not None:
            lo_hi = list(self.lr_range)
            if len(lo_hi) != 2 or not all(isinstance(v, int | float) and v > 0 for v in lo_hi) or lo_hi[0] >= lo_hi[1]:
                raise ConfigError(
                    f"The value of `lr_range` is {self.lr_range!r}, but must be [low, high] with 0 < low < high"
                )
            if self.search != "optuna":
                raise ConfigError("`lr_range` is for `search: optuna`; a grid search takes `grid.lrs`")

    def _check_storage(self) -> list[str]:
        """``storage_path``: a note (its credentials redacted) when an object-store URI carries credentials."""
        if is_remote(self.storage_path) and "@" in urlsplit(self.storage_path).netloc:
            return [
                f"storage_path {redact(self.storage_path)} carries credentials: Ray Tune keeps its storage path, and "
                "the sweep its checkpoint locations, in plain text on that storage; prefer the nodes' instance "
                "role or the standard AWS/GCP environment variables"
            ]
        return []

    def _check_models(self) -> list[str]:
        """Every decoder and encoder name, then each trial's training config, and each architecture once (per
        decoder, encoder and batch size) at the cache's tile size on the meta device. Returns the resolved
        encoders' notes. Needs :meth:`_check_data` and :meth:`_check_grid` to have passed."""
        g = self.grid
        for d in g.decoders:
            resolve_decoder(d)
        notes: list[str] = []
        for enc in g.encoders:  # names first: cheap, and the commonest mistake
            notes += resolve_model(ModelConfig(encoder=enc, weights=g.weights.get(enc))).notes
        size = TrainingCache(self.cache).tile_size
        seen = set()
        for cfg in self.trial_configs():
            t = TrainConfig.from_dict(cfg)
            t.validate()
            bad = [r for r in self.rungs if r % t.val_every and r != t.epochs]
            if bad:
                raise ConfigError(
                    f"The value of `val_every` is {t.val_every}, but the rungs {bad} are not multiples of it: a trial "
                    "is ranked at every rung by the score of that epoch; use val_every 1 or rungs that it divides"
                )
            large = [st.cfg.crop for st in t.plan() if st.cfg.crop and st.cfg.crop > size]
            if large:
                raise ConfigError(
                    f"The value of `crop` is {large[0]}, but the cache's tiles are {size} px: use a crop <= {size} "
                    "or a cache with less downsampling"
                )
            # Trained on crops (each stage's) and validated on whole tiles: the model must take every size.
            shapes = {(st.cfg.crop or size, st.cfg.batch_size) for st in t.plan()} | {(size, 2)}
            for shape, batch in sorted(shapes):
                combo = (t.model.decoder, t.model.encoder, shape, batch)
                if combo not in seen:  # one model check per architecture and input, not per learning rate
                    seen.add(combo)
                    validate_model_config(t.model, shape, batch)
        return notes


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def add_config_args(ap: argparse.ArgumentParser, config_help: str = "a sweep YAML (sweeps/configs/)") -> None:
    """The arguments every entry script takes: the sweep's YAML and the overrides a cluster needs."""
    ap.add_argument("--config", required=True, help=config_help)
    ap.add_argument("--cache", default=None, help="override the config's cache (an absolute path on a cluster)")
    ap.add_argument("--storage", default=None, help="override the config's storage_path")
    ap.add_argument("--tracking-uri", default=None, help="override the config's MLflow tracking URI")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The sweep config :func:`add_config_args` names, with its overrides applied."""
    cfg = SweepConfig.from_yaml(args.config)
    overrides = {"cache": args.cache, "storage_path": args.storage, "tracking_uri": args.tracking_uri}
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v})

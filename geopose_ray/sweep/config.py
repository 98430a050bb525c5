"""A sweep's configuration: the data, the grid, the promoter's rungs, resources and budget; validated before
Ray starts, so a typo fails in seconds with the valid choices instead of after trials have started."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
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
from geopose_ray.sweep.cost import BudgetPlan, DataSize, budget_plan, epoch_hours
from geopose_ray.sweep.files import SweepFiles
from geopose_ray.sweep.promoter import check_schedule

CORE_AXES = ("encoder", "decoder", "lr", "accumulation")  # a grid point's keys for grid.encoders ... accumulation
# Training keys a named axis cannot set: the four above have their own lists, the rest the sweep sets itself.
_SET_BY_SWEEP = {"model.encoder": "grid.encoders", "model.decoder": "grid.decoders", "model.weights": "grid.weights",
                 "lr": "grid.lrs", "accumulation": "grid.accumulation", "cache": "cache", "val_fold": "val_fold",
                 "epochs": "rungs"}  # fmt: skip
DEFAULT = "default"  # in a per-encoder axis: the values of every encoder not named


@dataclass(frozen=True)
class GridConfig:
    """The screened grid: every combination is one trial.

    ``axes`` are further axes by dotted training key (``crop``, ``loss.kind``, ``augment.photometric.p``,
    ``model.decoder_kwargs.decoder_channels``): a list of values for every encoder, or a mapping of encoder
    names (and ``default`` for the rest) to their own lists, where values must differ by encoder (a batch size,
    a crop that fits). Every combination of the four lists and every axis is one trial."""

    encoders: list[str] = field(default_factory=lambda: ["resnet34"])
    decoders: list[str] = field(default_factory=lambda: ["Unet"])
    lrs: list[float] = field(default_factory=lambda: [1e-4])
    accumulation: list[int] = field(default_factory=lambda: [1])
    weights: dict[str, str | None] = field(default_factory=dict)  # per encoder; missing = `train.model.weights`
    batch_size: dict[str, int] = field(default_factory=dict)  # per encoder; missing = `train.batch_size`
    axes: dict[str, Any] = field(default_factory=dict)  # dotted training key -> values, or encoder -> values

    def axis_values(self, axis: str, encoder: str) -> list[Any]:
        """The values of the named axis ``axis`` for trials of ``encoder``.

        Raises:
            ConfigError: the axis gives that encoder no non-empty list.
        """
        spec = self.axes[axis]
        where = f"`grid.axes.{axis}`"
        if isinstance(spec, dict):
            if encoder not in spec and DEFAULT not in spec:
                raise ConfigError(f"{where} gives no values for {encoder!r}; name it or add `{DEFAULT}: [...]`")
            spec, where = (spec[encoder], f"{where}.{encoder}") if encoder in spec else (spec[DEFAULT], where)
        if not isinstance(spec, list) or not spec:
            raise ConfigError(f"{where} is {spec!r}: give a non-empty list of values (or a mapping of encoders)")
        return list(spec)

    def points(self) -> list[dict[str, Any]]:
        """Every grid point, as ``{"encoder", "decoder", "lr", "accumulation", <axis>...}``, in the listed order
        (the encoders outermost, the last named axis innermost)."""
        out = []
        for enc in self.encoders:
            lists: list[list[Any]] = [self.decoders, self.lrs, self.accumulation]
            lists += [self.axis_values(a, enc) for a in self.axes]
            for combo in itertools.product(*lists):
                out.append(dict(zip((*CORE_AXES, *self.axes), (enc, *combo), strict=True)))
        return out


def get_dotted(cfg: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key of a nested dict (None where a level is missing or None)."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key of a nested dict in place, copying the levels on the way (a level that is missing or
    None becomes a mapping)."""
    head, _, rest = key.partition(".")
    if not rest:
        cfg[head] = value
        return
    level = cfg.get(head)
    cfg[head] = dict(level) if isinstance(level, Mapping) else {}
    set_dotted(cfg[head], rest, value)


def axis_label(value: Any) -> Any:
    """An axis value as a column, a param and a level of the guided order show it: a number, string, boolean or
    None as it is; a list or mapping as compact JSON (keys sorted)."""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    return value


def axis_columns(cfg: Mapping[str, Any], axes: Sequence[str]) -> dict[str, Any]:
    """A trial's value of each named axis, read back from its TrainConfig dict, as :func:`axis_label` shows it."""
    return {a: axis_label(get_dotted(cfg, a)) for a in axes}


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
    # Which finalists get fold runs, on which folds: {top_k: K} only the best K finalists by their top-rung score
    # (default every finalist); {folds: [1, 2]} only those folds (default every fold but val_fold).
    fold_runs: dict[str, Any] = field(default_factory=dict)
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
        if not isinstance(grid, dict):
            raise ConfigError(f"`grid` must be a mapping of axes, got {grid!r}")
        bad = sorted(set(grid) - set(grid_names))
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in `grid`; valid keys: {grid_names}")
        if not isinstance(grid.get("axes", {}) or {}, dict):
            raise ConfigError(f"`grid.axes` must map dotted training keys to lists of values, got {grid['axes']!r}")
        grid["axes"] = dict(grid.get("axes") or {})
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

    def trial_config(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """One trial's TrainConfig dict (what a Ray Tune trial trains), for a grid point (:meth:`GridConfig.points`:
        encoder, decoder, lr, accumulation and a value for each named axis).

        Raises:
            ConfigError: the point makes an invalid training config (naming the axis values and the key).
        """
        g = self.grid
        encoder = str(point["encoder"])
        model = {**self.train.get("model", {}), "encoder": encoder, "decoder": point["decoder"]}
        if encoder in g.weights:
            model["weights"] = g.weights[encoder]
        batch = g.batch_size.get(encoder, self.train.get("batch_size", TrainConfig.batch_size))
        cfg = {
            **self.train,
            # Trials run in their own working directories, on any node: a relative path would not resolve.
            "cache": self.cache if "://" in self.cache else str(Path(self.cache).resolve()),
            "val_fold": self.val_fold,
            "model": model,
            "lr": _number_value(point["lr"]),
            "accumulation": point["accumulation"],
            "batch_size": batch,
            "epochs": self.rungs[-1],
        }
        for axis in g.axes:
            set_dotted(cfg, axis, point[axis])
        with self._naming(point):
            return TrainConfig.from_dict(cfg).to_dict()

    @contextlib.contextmanager
    def _naming(self, point: Mapping[str, Any]) -> Iterator[None]:
        """A ConfigError raised inside names the grid point's named axis values, where the grid has any."""
        try:
            yield
        except ConfigError as e:
            if not self.grid.axes:
                raise
            named = ", ".join(f"{a}={axis_label(point[a])}" for a in self.grid.axes)
            raise ConfigError(f"the grid point with {named} ({point['encoder']}): {e}") from e

    def trial_configs(self) -> list[dict[str, Any]]:
        """Every grid point as a plain TrainConfig dict (the grid search's trials)."""
        return [self.trial_config(p) for p in self.grid.points()]

    @property
    def n_trials(self) -> int:
        if self.search == "optuna":
            return self.num_samples
        return len(self.grid.points())

    def budget_plan(self) -> BudgetPlan:
        """What ``budget_gpu_hours`` buys on this grid (:mod:`geopose_ray.sweep.cost`), each point costed from its
        pixels and encoder on the cache's tiles (Optuna's draws at the grid's mean). Needs a valid config."""
        cache = TrainingCache(self.cache)
        val = sum(1 for r in cache.rows if r.fold == self.val_fold)
        data = DataSize(len(cache.rows) - val, val, cache.tile_size)
        costs = [epoch_hours(TrainConfig.from_dict(c), data) for c in self.trial_configs()]
        if self.search == "optuna":
            costs = [sum(costs) / len(costs)] * self.num_samples
        return budget_plan(costs, self.rungs, self.eta, self.budget_gpu_hours)

    @property
    def axes(self) -> list[str]:
        """The grid's named axes (dotted training keys): columns of the results table, params, guided axes."""
        return list(self.grid.axes)

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
        self._check_fold_runs()
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
        for lr in map(_number_value, g.lrs):
            if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
                raise ConfigError(f"The value {lr!r} in `grid.lrs` is not valid: learning rates must be > 0")
        for steps in g.accumulation:
            if not (isinstance(steps, int) and steps >= 1):
                raise ConfigError(f"The value {steps!r} in `grid.accumulation` is not valid: steps must be >= 1")
        for axis, spec in g.axes.items():
            self._check_axis(axis, spec)

    def _check_axis(self, axis: str, spec: Any) -> None:
        """A named axis: a dotted key the sweep does not set itself; a non-empty list, or a mapping of this grid's
        encoders (and ``default``) to non-empty lists that covers every encoder; for optuna, one count of values."""
        where = f"`grid.axes.{axis}`"
        if not isinstance(axis, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", axis):
            raise ConfigError(f"The axis name {axis!r} in `grid.axes` is not a dotted training key (as loss.kind)")
        if axis in _SET_BY_SWEEP:
            raise ConfigError(f"{where} cannot be an axis: the sweep sets it from `{_SET_BY_SWEEP[axis]}`")
        inside = [k for k in _SET_BY_SWEEP if k.startswith(f"{axis}.")]
        if inside:
            raise ConfigError(f"{where} would replace `{inside[0]}`, which the sweep sets: name a key inside it")
        overlap = [a for a in self.grid.axes if a != axis and (a.startswith(f"{axis}.") or axis.startswith(f"{a}."))]
        if overlap:
            raise ConfigError(f"{where} and `grid.axes.{overlap[0]}` set the same key; give one of them")
        if axis == "batch_size" and self.grid.batch_size:
            raise ConfigError(f"{where} and `grid.batch_size` both set the batch size; give one of them")
        lists = list(spec.items()) if isinstance(spec, dict) else [("", spec)]
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(self.grid.encoders) - {DEFAULT})
            if unknown:
                raise ConfigError(
                    f"{where} names {unknown}, which are not in `grid.encoders`; name encoders of the grid, or "
                    f"`{DEFAULT}` for every encoder not named"
                )
            missing = [e for e in self.grid.encoders if e not in spec and DEFAULT not in spec]
            if missing:
                raise ConfigError(f"{where} gives no values for {missing}; name them or add `{DEFAULT}: [...]`")
        for who, values in lists:
            if not isinstance(values, list) or not values:
                at = f"{where}.{who}" if who else where
                raise ConfigError(f"{at} is {values!r}: give a non-empty list of values")
        if self.search == "optuna" and len({len(v) for _, v in lists}) > 1:
            raise ConfigError(
                f"{where} gives the encoders different numbers of values; with `search: optuna` the draw is an "
                "index into the list, so give every encoder as many values"
            )

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

    @property
    def fold_top_k(self) -> int | None:
        """``fold_runs.top_k``: how many finalists get fold runs (None: every one)."""
        return self.fold_runs.get("top_k")

    def fold_run_folds(self, cache_folds: Sequence[int]) -> list[int]:
        """The folds a finalist's fold runs validate on: ``fold_runs.folds``, or every fold but ``val_fold``."""
        chosen = self.fold_runs.get("folds")
        return sorted(chosen) if chosen is not None else sorted(set(cache_folds) - {self.val_fold})

    def _check_fold_runs(self) -> None:
        """``fold_runs``: ``top_k`` an integer >= 1, ``folds`` folds of the cache other than ``val_fold``."""
        if not isinstance(self.fold_runs, dict):
            raise ConfigError(f"`fold_runs` must be a mapping (top_k, folds), got {self.fold_runs!r}")
        unknown = sorted(set(self.fold_runs) - {"top_k", "folds"})
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in `fold_runs`; valid keys: ['folds', 'top_k']")
        k = self.fold_runs.get("top_k")
        if k is not None and not (_is_int(k) and k >= 1):
            raise ConfigError(f"The value of `fold_runs.top_k` is {k!r}, but must be an integer >= 1 (or null: all)")
        folds = self.fold_runs.get("folds")
        if folds is None:
            return
        have = sorted({r.fold for r in TrainingCache(self.cache).rows})
        if not (isinstance(folds, list) and folds and all(_is_int(f) for f in folds)) or len(set(folds)) < len(folds):
            raise ConfigError(
                f"The value of `fold_runs.folds` is {folds!r}, but must be a non-empty list of distinct folds"
            )
        bad = sorted(set(folds) - set(have) | ({self.val_fold} & set(folds)))
        if bad:
            raise ConfigError(
                f"The value of `fold_runs.folds` is {folds}, but {bad} are not folds to run: the cache has folds "
                f"{have} and screening validates on val_fold {self.val_fold}"
            )

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
        seen: set[tuple[Any, ...]] = set()
        for point in self.grid.points():
            with self._naming(point):
                self._check_trial(TrainConfig.from_dict(self.trial_config(point)), size, seen)
        return notes

    def _check_trial(self, t: TrainConfig, size: int, seen: set[tuple[Any, ...]]) -> None:
        """One trial's training config: valid, ranked at every rung, its crops within the cache's tiles, and its
        architecture built on the meta device at each input it takes (once per architecture and input in
        ``seen``)."""
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


def _number_value(value: Any) -> Any:
    """A learning rate as YAML wrote it: ``1e-3`` (a string to YAML 1.1) is the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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

"""What a sweep's trials cost before any has run, and what a GPU-hour budget buys with it.

**Hours per epoch of a grid point** (T4-hours, the unit of the seed's table and of the simulator): the seed's
measured minutes per epoch of its encoder's U-Net (``simulate/curves.py``: whole 1024² tiles, the four training
folds of 5,923 tiles), times its decoder's cost factor against a U-Net, times the ratio of the pixels an epoch
trains on (training tiles × crops per tile × crop², or × tile² for whole tiles) to the table's
(4,738 tiles × 1024²), plus its validation (whole tiles of the held-out fold, forward only: a third of a
training pixel's cost, every ``val_every`` epochs). Convolutions cost in proportion to pixels, so this holds for
crops of any size; an encoder not in the table is scaled from its family's listed one by its multiply-adds at
224² (counted on PyTorch's meta device, as the simulator scales its unmeasured encoders: half an epoch's cost
fixed, half in proportion). Staged runs cost each stage at its own crop. Mixed precision and the device's
speed are not modelled: the figures are T4-hours of the seed's setup, for comparing points and budgets.

**What a budget buys** (:func:`budget_plan`): successive halving over ``n`` trials promotes ⌊n/η⌋ from the
first rung, ⌊n/η²⌋ from the second and so on; its expected cost at the grid's mean hours per epoch is
Σ_r n_r × (rung_r − rung_(r−1)) × mean. The plan is the largest ``n`` (at most the grid) whose cost fits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from geopose_ray.engine.config import TrainConfig
from geopose_ray.simulate.curves import DECODERS, ENCODERS
from geopose_ray.sweep.promoter import halving_counts, halving_hours

SEED_TILES = 5923 * 4 / 5  # training tiles per epoch in the seed's table (5 folds)
SEED_PIXELS = SEED_TILES * 1024**2
VALIDATION_SHARE = 1 / 3  # a validation pixel (forward only) against a training one (forward and backward)
# An unmeasured encoder's family reference in the seed's table (by name), and the fallback.
FAMILIES = (("efficientnet", "efficientnet-b0"), ("regnet", "tu-regnetx_064"), ("inception", "inceptionv4"),
            ("se_resnext", "se_resnext50_32x4d"), ("resnext", "resnext50_32x4d"))  # fmt: skip
FALLBACK = "resnet34"


@functools.cache
def encoder_gmacs(encoder: str) -> float:
    """Multiply-adds (billions) of one 224² image through ``encoder``, counted on the meta device."""
    import segmentation_models_pytorch as smp
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = smp.encoders.get_encoder(encoder, weights=None)
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2e9


@functools.cache
def reference_minutes(encoder: str) -> float:
    """T4 minutes per epoch of ``encoder``'s U-Net on the seed's table's epoch (measured, else family-scaled)."""
    measured = {k: e.minutes for k, e in ENCODERS.items() if e.measured}
    if encoder in measured:
        return measured[encoder]
    name = encoder.removeprefix("tu-").removeprefix("tf_")
    ref = next((r for fam, r in FAMILIES if fam in name), FALLBACK)
    return measured[ref] * (0.5 + 0.5 * encoder_gmacs(encoder) / encoder_gmacs(ref))


@dataclass(frozen=True)
class DataSize:
    """The tiles a trial trains and validates on, at the cache's resolution."""

    train_tiles: int
    val_tiles: int
    tile_size: int


def epoch_hours(cfg: TrainConfig, data: DataSize) -> float:
    """T4-hours per epoch of a trial (the module docstring), averaged over its stages' epochs."""
    per_pixel = reference_minutes(cfg.model.encoder) / 60.0 / SEED_PIXELS
    per_pixel *= DECODERS[cfg.model.decoder].cost if cfg.model.decoder in DECODERS else 1.0
    total = 0.0
    for stage in cfg.plan():
        s = stage.cfg
        side = s.crop or data.tile_size
        train = data.train_tiles * (s.crops_per_tile if s.crop else 1) * side**2
        val = data.val_tiles * data.tile_size**2 * VALIDATION_SHARE / max(1, s.val_every)
        total += (stage.end - stage.start) * per_pixel * (train + val)
    return total / max(1, cfg.epochs)


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget buys on a grid (:func:`budget_plan`)."""

    grid: int  # grid points
    screened: int  # how many the budget lets start (all of them without a budget)
    finalists: int  # expected trials at the top rung
    screening_hours: float  # expected GPU-hours of screening ``screened`` trials
    grid_screening_hours: float  # ... of screening the whole grid
    first_rung_hours: float  # the whole grid to the first rung
    full_grid_hours: float  # every point to the top rung
    budget: float | None

    @property
    def screens_grid(self) -> bool:
        return self.screened == self.grid

    def statement(self) -> str:
        """One line for the sweep's start-up."""
        head = (
            f"{self.grid} grid points; expected T4-hours (costed by pixels and encoder): "
            f"{_hours(self.first_rung_hours)} for all to the first rung, "
            f"{_hours(self.grid_screening_hours)} to screen all by successive halving, "
            f"{_hours(self.full_grid_hours)} for all to the top rung"
        )
        if self.budget is None:
            return f"{head}; no budget: all {self.grid} start, about {self.finalists} finalist(s)"
        return (
            f"{head}; the budget of {_hours(self.budget)} GPU-hours allows {self.screened} first-rung trials and "
            f"about {self.finalists} finalist(s) ({_hours(self.screening_hours)} expected)"
        )


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}"


def budget_plan(costs: Sequence[float], rungs: Sequence[int], eta: int, budget: float | None) -> BudgetPlan:
    """What ``budget`` GPU-hours buy on a grid whose points cost ``costs`` hours per epoch (module docstring)."""
    n = len(costs)
    mean = sum(costs) / n if n else 0.0
    screened = n
    if budget is not None:
        screened = 0
        while screened < n and halving_hours(screened + 1, rungs, eta, mean) <= budget:
            screened += 1
    return BudgetPlan(
        grid=n,
        screened=screened,
        finalists=halving_counts(screened, len(rungs), eta)[-1] if screened else 0,
        screening_hours=halving_hours(screened, rungs, eta, mean),
        grid_screening_hours=halving_hours(n, rungs, eta, mean),
        first_rung_hours=sum(costs) * rungs[0],
        full_grid_hours=sum(costs) * rungs[-1],
        budget=budget,
    )

"""Learning curves for the sweep simulator: a small family fitted to the seed's T4 screening table.

A trial's validation score at epoch ``e`` (1 ≤ e ≤ the top rung) is

    s(e) = Q − R / (τ + e) − κ · max(0, ln(e / e_p)) + ε,    ε ~ N(0, σ²), τ = 8 epochs

Q is the plateau the run approaches, R its rise debt (score × epochs: the gap to Q is about R/e late in
training), e_p the epoch where overfitting starts and κ the score lost per e-fold of epochs after it. Fitted by
least squares to the U-Net rows of the seed's table (docs/simulator.md; 5-fold means on the private LB, all at
Adam lr 1e-4), the hyperbola leaves residuals of at most 0.001:

    ResNet34       Q 0.8345 R 2.53    0.8224@200 0.8260@300 0.8286@400 0.8294@500
    EffNet-B0      Q 0.7947 R 0.38    0.7929@200 0.7938@400
    Inception-v4   Q 0.8284 R 1.31    0.8154@90 0.8200@170 0.8247@290, then 0.8195@400: e_p 290, κ 0.018
    ResNeXt50-SWSL Q 0.8376 R 1.13    0.8273@100 0.8306@170 0.8333@230
    (no overfitting seen for these three up to 230-500 epochs: e_p 600 assumed, κ 0.014 as the others)
    SE-ResNeXt50   Q 0.8351 (R 1.13 assumed, as its sibling): 0.8263@120 0.8213@180 0.8221@240: e_p 120, κ 0.014
    RegNetX-064    Q 0.8362 (R 1.13 assumed): 0.8234@80 0.8202@150: e_p 80, κ 0.014
    DeepLabV3/ResNet34: Q 0.8230 R 3.26 (0.8010@140 0.8139@350): plateau −0.0115, rise × 1.29 against U-Net
    FPN/ResNeXt50: flat, 0.8090@140 0.8089@330: plateau −0.0288, rise × 0.05 against U-Net

So the late bloomers are in the table itself: ResNet34's U-Net ends above EffNet-B0's and FPN/ResNeXt50's
but is below both at epoch 20 (0.744 against 0.781 and 0.810), and DeepLabV3 rises slowest of all. Scores
before epoch 80 are extrapolations of the fit: the table has no early points.

Everything else is an assumption, stated here and drawn afresh per seed so no ranking is hard-coded:

- Noise σ = 0.002 about the curve: the fit's residuals on 5-fold means (≤ 0.001) times about √5 for the one
  validation fold a sweep trial reports; three times that at ten times the best learning rate. Part of it is
  the run's own, the same at every epoch (how its validation fold happens to suit this configuration: it does
  not average out over epochs, only over folds), the rest wobbles from epoch to epoch (which batches the last
  steps saw: it averages out over the last epochs). The table cannot tell the two apart; the share that
  persists is a parameter, ``persistent`` (variance share, default :data:`PERSISTENT` = ½), and
  docs/benchmarks/sweep-targets.md gives the targets at 0, ½ and 1.
- Learning rate: each (encoder, decoder) pair has its own best lr, 10^N(−4, 0.25). With
  x = log10(lr / best) − ½ log10(accumulation) (Adam's square-root rule: accumulating k micro-batches per step
  takes k× fewer steps per epoch), the plateau loses 0.004 x² below the best and 0.015 x² above it, the rise
  debt scales by 10^(−0.8 x) below (slow starters) and 10^(−0.3 x) above, and overfitting starts at
  e_p · 10^(−0.5 x). Accumulation also costs 0.001 per doubling of the effective batch.
- Instability: with probability 0.6 · sigmoid((x − 0.7) / 0.15) (about half the runs at 10× the best lr, 0.6 %
  at the best) a run breaks at an epoch log-uniform in [2, 400]: half stop with a non-finite loss (the engine
  ends the trial: no result for that epoch, none after), half collapse to a score uniform in [0.2, 0.6].
- Per seed: each measured encoder's plateau ± 0.002, each unmeasured one's ± 0.006 (and its rise debt × a
  log-normal of sd 0.4); measured decoders ± 0.002, unmeasured ± 0.004; encoder × decoder interaction ± 0.003;
  per trial: plateau ± 0.0015 (run-to-run), rise debt × a log-normal of sd 0.25, e_p × one of sd 0.3.
- Decoders absent from the table (plateau shift, rise factor, cost factor against U-Net): those that decode to
  full resolution near U-Net (UnetPlusPlus 0 / 1.0 / 1.6, MAnet −0.003 / 1.1 / 1.3, Linknet −0.005 / 1.0 /
  0.85), those with coarse outputs near FPN and DeepLabV3 (DeepLabV3Plus −0.010 / 1.1 / 1.1, PAN −0.020 /
  0.5 / 0.8).
- Minutes per epoch are the table's (ResNet34 and EffNet-B0 as the table lists them, in fp32); the other
  decoders scale the U-Net figure by their factor (FPN 14/18, DeepLabV3 25/16.5 from the table). Encoders
  not in the table (the large population only) are scaled from their family's listed one by GFLOPs at 224²,
  half of an epoch fixed (decoder, heads, data at 1024²): minutes = ref · (½ + ½ · GFLOPs / ref GFLOPs); their
  plateaus are guesses near their family's and their rise debts their family's (ResNet 2.53, ResNeXt and RegNet
  1.13, EfficientNet 0.38), with the larger per-seed spread above.

The true final score of a trial, which only the simulator sees, is the noise-free s at the top rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from geopose_ray.errors import ConfigError

TAU = 8.0  # epochs: the hyperbola's offset (the fits above use it)
NOISE = 0.002  # sd of one fold's validation score about the curve
PERSISTENT = 0.5  # the share of NOISE's variance that is the run's own, the same at every epoch
LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)  # the learning rates of sweeps/configs/screen-t4.yaml
ACCUMULATION = (1, 4, 16)  # its accumulation steps
UNSEEN = 600.0  # e_p of an encoder the table shows no overfitting for (up to 230-500 epochs)


@dataclass(frozen=True)
class Encoder:
    minutes: float  # T4 minutes per epoch of a U-Net at 1024² (the table, or FLOP-scaled from it)
    plateau: float  # Q of its U-Net at its best lr (fitted, or assumed when not measured)
    rise: float  # R: rise debt, score × epochs
    peak: float  # e_p: epoch where overfitting starts at the best lr
    measured: bool  # in the seed's table (small per-seed spread) or an assumption (larger spread)
    kappa: float = 0.014  # κ: score lost per e-fold of epochs past e_p


@dataclass(frozen=True)
class Decoder:
    cost: float  # minutes per epoch relative to a U-Net with the same encoder
    plateau: float  # plateau shift against a U-Net
    rise: float  # rise-debt factor against a U-Net
    measured: bool


def curve(q: np.ndarray, r: np.ndarray, peak: np.ndarray, kappa: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """The noise-free family, s(e) = Q − R/(τ + e) − κ·max(0, ln(e/e_p)): (n,) parameters, (m,) epochs → (n, m)."""
    e = np.asarray(epochs, dtype=float)[None, :]
    q, r, peak, kappa = (np.asarray(a, dtype=float)[:, None] for a in (q, r, peak, kappa))
    return q - r / (TAU + e) - kappa * np.log(np.maximum(e / peak, 1.0))


def _flop_scaled(ref_minutes: float, ref_gflops: float, gflops: float) -> float:
    return ref_minutes * (0.5 + 0.5 * gflops / ref_gflops)


ENCODERS: dict[str, Encoder] = {
    # The seed's table (the six encoders of sweeps/configs/screen-t4.yaml).
    "resnet34": Encoder(16.5, 0.8345, 2.53, UNSEEN, True),
    "efficientnet-b0": Encoder(19.0, 0.7947, 0.38, UNSEEN, True),
    "inceptionv4": Encoder(20.0, 0.8284, 1.31, 290.0, True, kappa=0.018),
    "se_resnext50_32x4d": Encoder(20.0, 0.8351, 1.13, 120.0, True),
    "tu-regnetx_064": Encoder(29.0, 0.8362, 1.13, 80.0, True),
    "resnext50_32x4d": Encoder(18.0, 0.8376, 1.13, UNSEEN, True),
    # Not in the table: family plateaus and rise debts, minutes scaled by GFLOPs (224²) from the listed sibling.
    "resnet18": Encoder(_flop_scaled(16.5, 3.6, 1.8), 0.8300, 2.53, UNSEEN, False),
    "resnet50": Encoder(_flop_scaled(16.5, 3.6, 4.1), 0.8360, 2.53, UNSEEN, False),
    "resnet101": Encoder(_flop_scaled(16.5, 3.6, 7.8), 0.8370, 2.53, 250.0, False),
    "resnext101_32x8d": Encoder(_flop_scaled(18.0, 4.3, 16.5), 0.8390, 1.13, 120.0, False),
    "efficientnet-b3": Encoder(_flop_scaled(19.0, 0.39, 1.0), 0.8000, 0.38, UNSEEN, False),
    "tu-regnetx_032": Encoder(_flop_scaled(29.0, 6.4, 3.2), 0.8330, 1.13, 100.0, False),
}
SEED_ENCODERS = tuple(list(ENCODERS)[:6])

DECODERS: dict[str, Decoder] = {
    "Unet": Decoder(1.0, 0.0, 1.0, True),
    "FPN": Decoder(14.0 / 18.0, -0.0288, 0.05, True),
    "DeepLabV3": Decoder(25.0 / 16.5, -0.0115, 1.29, True),
    "DeepLabV3Plus": Decoder(1.1, -0.010, 1.1, False),
    "UnetPlusPlus": Decoder(1.6, 0.0, 1.0, False),
    "Linknet": Decoder(0.85, -0.005, 1.0, False),
    "MAnet": Decoder(1.3, -0.003, 1.1, False),
    "PAN": Decoder(0.8, -0.020, 0.5, False),
}


@dataclass
class Curves:
    """One population of trials: what each would report at every epoch, and what only the simulator knows.

    Built by :func:`draw_curves`, or by hand in tests.
    """

    names: list[str]  # "<decoder>/<encoder>/lr<lr>/acc<k>", one per trial
    minutes: np.ndarray  # (n,) T4 minutes per epoch
    observed: np.ndarray  # (n, top) the validation score reported after epochs 1..top; NaN: never reported
    fail_epoch: np.ndarray  # (n,) int: the epoch in which the trial errors (a non-finite loss); top + 1: never
    true_final: np.ndarray  # (n,) noise-free score at the top rung; NaN for a trial that errors before it
    noise: np.ndarray | None = None  # (n,) sd of one fold's score about the true one; None: NOISE for every trial
    persistent: float = 0.0  # the share of noise² that is the same at every epoch (0: independent epochs)
    params: list[dict[str, str]] | None = None  # per trial, the guided order's levels (None: parsed from names)

    def __post_init__(self) -> None:
        n = self.observed.shape[0]
        if self.noise is None:
            self.noise = np.full(n, NOISE)
        if not (len(self.names) == len(self.minutes) == len(self.fail_epoch) == len(self.true_final) == n):
            raise ConfigError(f"Curves of {n} trials need {n} names, minutes, fail epochs and true finals")
        if np.any(self.minutes <= 0):
            raise ConfigError("Every trial's `minutes` per epoch must be > 0")
        if not 0 <= self.persistent <= 1:
            raise ConfigError(f"The value of `persistent` is {self.persistent}, but must be a variance share in [0, 1]")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def top(self) -> int:
        return int(self.observed.shape[1])

    def hours(self, trial: int, epochs: int) -> float:
        """GPU-hours of ``epochs`` epochs of a trial."""
        return float(epochs * self.minutes[trial] / 60.0)


def population(n: int, rng: np.random.Generator) -> list[tuple[str, str, float, int]]:
    """The trials' (encoder, decoder, lr, accumulation). n = 240 is the seed's grid (6 encoders × 8 decoders ×
    5 learning rates; screen-t4.yaml without its accumulation axis); fewer are drawn from it. n = 720 is
    screen-t4.yaml's grid itself (with accumulation 1, 4 and 16); 241 to 719 are drawn from it. More are drawn
    from 12 encoders × 8 decoders × 5 lrs × 3 accumulation steps (1,440), with replacement beyond that."""
    if n < 1:
        raise ConfigError(f"The value of `trials` is {n}, but must be `trials >= 1`")
    if n <= len(SEED_ENCODERS) * len(DECODERS) * len(LRS):
        space = [(e, d, lr, 1) for e in SEED_ENCODERS for d in DECODERS for lr in LRS]
    elif n <= len(SEED_ENCODERS) * len(DECODERS) * len(LRS) * len(ACCUMULATION):
        space = [(e, d, lr, k) for e in SEED_ENCODERS for d in DECODERS for lr in LRS for k in ACCUMULATION]
    else:
        space = [(e, d, lr, k) for e in ENCODERS for d in DECODERS for lr in LRS for k in ACCUMULATION]
    if n == len(space):
        return space
    picks = rng.choice(len(space), size=n, replace=n > len(space))
    return [space[i] for i in picks]


def draw_curves(n: int, seed: int, top: int = 200, persistent: float = PERSISTENT) -> Curves:
    """Draw ``n`` trials' curves up to epoch ``top``, deterministically from ``seed``; ``persistent`` is the
    share of the noise's variance that stays the same over a run's epochs."""
    if top < 1:
        raise ConfigError(f"The value of `top` is {top}, but must be a positive epoch")
    if not 0 <= persistent <= 1:
        raise ConfigError(f"The value of `persistent` is {persistent}, but must be a variance share in [0, 1]")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    configs = population(n, rng)
    enc_names, dec_names = list(ENCODERS), list(DECODERS)
    ei = np.array([enc_names.index(c[0]) for c in configs])
    di = np.array([dec_names.index(c[1]) for c in configs])
    lr = np.array([c[2] for c in configs])
    acc = np.array([c[3] for c in configs], dtype=float)
    encs, decs = [ENCODERS[k] for k in enc_names], [DECODERS[k] for k in dec_names]

    # Per-seed effects: encoder, decoder and pair shifts; each pair's best learning rate.
    enc_q = np.array([e.plateau for e in encs]) + rng.normal(0, 1, len(encs)) * [
        0.002 if e.measured else 0.006 for e in encs
    ]
    enc_r = np.array([e.rise for e in encs]) * np.exp(
        rng.normal(0, 1, len(encs)) * [0 if e.measured else 0.4 for e in encs]
    )
    dec_q = np.array([d.plateau for d in decs]) + rng.normal(0, 1, len(decs)) * [
        0.002 if d.measured else 0.004 for d in decs
    ]
    pair_q = rng.normal(0, 0.003, (len(encs), len(decs)))
    pair_lr = rng.normal(-4.0, 0.25, (len(encs), len(decs)))

    x = np.log10(lr) - pair_lr[ei, di] - 0.5 * np.log10(acc)
    lo, hi = np.minimum(x, 0), np.maximum(x, 0)
    q = enc_q[ei] + dec_q[di] + pair_q[ei, di] - 0.004 * lo**2 - 0.015 * hi**2 - 0.001 * np.log2(acc)
    q += rng.normal(0, 0.0015, n)
    r = enc_r[ei] * np.array([decs[i].rise for i in di]) * 10 ** (-0.8 * lo - 0.3 * hi)
    r *= np.exp(rng.normal(0, 0.25, n))
    peak = np.array([encs[i].peak for i in ei]) * 10 ** (-0.5 * x) * np.exp(rng.normal(0, 0.3, n))
    kappa = np.array([encs[i].kappa for i in ei])
    sigma = NOISE * (1 + 2 * np.clip(x, 0, 1))

    e = np.arange(1, top + 1, dtype=float)[None, :]
    base = curve(q, r, peak, kappa, e[0])

    # Instability at high effective learning rates: a non-finite loss (the trial errors) or a collapse.
    unstable = rng.random(n) < 0.6 / (1 + np.exp(-(x - 0.7) / 0.15))
    broken_at = np.exp(rng.uniform(np.log(2), np.log(400), n)).astype(int)
    collapses = rng.random(n) < 0.5
    collapse_to = rng.uniform(0.2, 0.6, n)
    fail = np.full(n, top + 1)
    errs = unstable & ~collapses & (broken_at <= top)
    fail[errs] = broken_at[errs]
    coll = unstable & collapses
    base = np.where(coll[:, None] & (e >= broken_at[:, None]), collapse_to[:, None], base)

    wobble = rng.standard_normal((n, top))
    own = rng.standard_normal((n, 1))  # drawn after the rest, so the other draws do not depend on `persistent`
    observed = base + sigma[:, None] * (math.sqrt(1 - persistent) * wobble + math.sqrt(persistent) * own)
    observed[e >= fail[:, None]] = np.nan
    true_final = np.where(fail <= top, np.nan, base[:, -1])
    names = [f"{c[1]}/{c[0]}/lr{c[2]:.0e}/acc{c[3]}" for c in configs]
    minutes = np.array([encs[i].minutes * decs[j].cost for i, j in zip(ei, di, strict=True)])
    return Curves(names, minutes, observed, fail, true_final, sigma, persistent)

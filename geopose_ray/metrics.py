"""The challenge score, as pure functions on arrays.

Per city, pooled over all valid pixels (truth AGL finite) of all its tiles:

* ``R²_h = 1 − Σ(ĥ−h)² / (Σ(h − mean_h)² + 1e-4)`` with ``mean_h = Σh / (n + 1e-4)``;
* ``R²_v = 1 − Σ‖v̂−v‖² / (Σ_k Σ(v_k − mean_v)² + 1e-4)`` with one scalar ``mean_v = Σ(v_x + v_y) / (2n + 1e-4)``;
* ``score_c = (R²_h + R²_v) / 2``; the final score is the mean over the cities present (a city whose tiles have
  no valid truth pixel is reported but left out).

Heights are in metres and flows in pixels. Prediction pixels that are NaN drop out of the error sums but not
of the totals. A missing prediction or a non-finite predicted scale or angle scores the whole city 0.

Tiles are reduced to :class:`TileStats` (sufficient statistics) so a dataset can be scored one tile at a time.
Totals use Chan's pairwise merge of (count, mean, M2), so pooling millions of pixels over thousands of tiles
loses no precision to cancellation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import NDArray

from geopose_ray.geometry import angle_error

EPS = 1e-4
ROWS_PER_BLOCK = 128


def _sumsq(x: NDArray[np.float64]) -> float:
    """Σx². einsum, not ``x @ x``: BLAS would start its own threads and oversubscribe parallel scoring."""
    return float(np.einsum("i,i->", x, x))


SCORE_WINDOW = 0.05  # score_avg averages the last 5 % of the epochs trained: 10 at epoch 200, 1 at a 20-epoch rung


def window_epochs(epoch: int, share: float = SCORE_WINDOW) -> int:
    """How many of the last epochs a trial's ``score_avg`` averages after ``epoch`` epochs: round(share × epoch),
    at least 1 and at most ``epoch``.

    One epoch's validation score wobbles about the run's level; the mean of the last few is a steadier estimate
    of it (Ray Tune's ``scope="last-10-avg"`` is the same idea). A window in proportion to the epochs trained
    keeps the lag behind a still-rising curve small: a mean of k epochs trails by (k − 1)/2 of them, which on a
    curve Q − R/e costs about share · R / (2e), 0.0003 at epoch 200 for the slowest-rising encoder of the seed's
    screening table (docs/simulator.md) (ResNet-34, R ≈ 2.5), while the 20-epoch rung's value is the plain score.
    """
    return max(1, min(epoch, round(share * epoch)))


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations from the mean of a set of values."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @staticmethod
    def of(values: NDArray[np.float64]) -> Moments:
        n = float(values.size)
        if n == 0:
            return Moments()
        mean = float(values.mean())
        return Moments(n, mean, _sumsq(values - mean))

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * other.n / n, self.m2 + other.m2 + delta * delta * self.n * other.n / n)

    def challenge_total(self) -> float:
        """``Σ(x − Σx/(n + 1e-4))²``: the challenge's total sum of squares, with its damped mean."""
        damped_mean = self.mean * self.n / (self.n + EPS)
        return self.m2 + self.n * (self.mean - damped_mean) ** 2


@dataclass(frozen=True)
class TileStats:
    """Sufficient statistics of one tile for the pooled score and the diagnostic errors.

    ``failed`` holds a reason when the prediction is unusable (missing file, non-finite scale or angle,
    wrong size): such a tile scores its city 0.
    """

    stem: str
    city: str
    agl: Moments = Moments()  # truth heights (metres) over valid pixels
    flow: Moments = Moments()  # truth flow components (pixels), both components pooled: 2n values
    agl_sse: float = 0.0  # Σ(ĥ−h)² over valid pixels with a finite prediction, m²
    flow_sse: float = 0.0  # Σ‖v̂−v‖² over the same pixels, px²
    n_scored: float = 0.0  # valid pixels with a finite prediction
    angle_err: float = math.nan  # |θ̂−θ| wrapped, radians
    scale_err: float = math.nan  # |ŝ−s|, pixels per metre
    failed: str | None = None


def tile_stats(
    stem: str,
    city: str,
    agl_true: NDArray[np.floating],
    scale_true: float,
    angle_true: float,
    agl_pred: NDArray[np.floating] | None,
    scale_pred: float,
    angle_pred: float,
) -> TileStats:
    """Reduce one tile to :class:`TileStats`.

    Args:
        agl_true: truth heights, metres, (H, W); NaN where no data.
        scale_true, scale_pred: pixels per metre.
        angle_true, angle_pred: radians.
        agl_pred: predicted heights, metres, (H, W); NaN pixels drop out of the error sums. ``None`` when the
            prediction file is missing.
    """
    h = np.asarray(agl_true)
    p = None if agl_pred is None else np.asarray(agl_pred)
    failed = None
    if p is None:
        failed = "prediction file missing"
    elif not (math.isfinite(scale_pred) and math.isfinite(angle_pred)):
        failed = f"predicted scale {scale_pred} or angle {angle_pred} is not finite"
    elif p.shape != h.shape:
        failed = f"predicted AGL is {p.shape[1]}x{p.shape[0]}, truth is {h.shape[1]}x{h.shape[0]}"
    a, b = scale_true * math.sin(angle_true), scale_true * math.cos(angle_true)
    a_pred, b_pred = (
        (scale_pred * math.sin(angle_pred), scale_pred * math.cos(angle_pred)) if failed is None else (0, 0)
    )
    heights = Moments()
    agl_sse = flow_sse = n_scored = 0.0
    # Blocks of rows keep the temporaries in cache: about 4x faster than whole-tile arrays at 2048².
    for r in range(0, h.shape[0], ROWS_PER_BLOCK):
        hb = h[r : r + ROWS_PER_BLOCK]
        valid = np.isfinite(hb)
        hv = hb[valid].astype(np.float64)
        heights = heights.merge(Moments.of(hv))
        if failed is not None or p is None:
            continue
        pv = p[r : r + ROWS_PER_BLOCK][valid].astype(np.float64)
        ok = np.isfinite(pv)
        if not ok.all():
            pv, hv = pv[ok], hv[ok]
        d = pv - hv
        dx = pv * a_pred - hv * a
        dy = pv * b_pred - hv * b
        agl_sse += _sumsq(d)
        flow_sse += _sumsq(dx) + _sumsq(dy)
        n_scored += pv.size
    # The flow components are a·h and b·h, so their pooled moments follow exactly from the heights'.
    flow = Moments(heights.n, a * heights.mean, a * a * heights.m2).merge(
        Moments(heights.n, b * heights.mean, b * b * heights.m2)
    )
    if failed is not None:
        return TileStats(stem, city, agl=heights, flow=flow, failed=failed)
    return TileStats(
        stem,
        city,
        agl=heights,
        flow=flow,
        agl_sse=agl_sse,
        flow_sse=flow_sse,
        n_scored=n_scored,
        angle_err=float(angle_error(angle_pred, angle_true)),
        scale_err=abs(scale_pred - scale_true),
    )


@dataclass
class CityScore:
    """The score of one city and its diagnostics. Angles in degrees, heights in metres, flows in pixels."""

    city: str
    tiles: int
    pixels: int
    agl_r2: float
    flow_r2: float
    score: float
    angle_err_mean_deg: float
    angle_err_rms_deg: float
    scale_err_mean: float  # pixels per metre
    agl_rmse_m: float
    epe_rmse_px: float
    failures: list[str] = field(default_factory=list)  # "stem: reason" for each unusable prediction


@dataclass
class ScoreReport:
    """Per-city scores and the final score (mean over the cities present)."""

    score: float
    cities: dict[str, CityScore]

    def as_dict(self) -> dict[str, object]:
        return {"score": self.score, "cities": {c: asdict(s) for c, s in self.cities.items()}}


def city_score(city: str, tiles: Iterable[TileStats]) -> CityScore:
    """Pool the tiles of one city into its score."""
    tiles = list(tiles)
    agl = Moments()
    flow = Moments()
    for t in tiles:
        agl = agl.merge(t.agl)
        flow = flow.merge(t.flow)
    failures = [f"{t.stem}: {t.failed}" for t in tiles if t.failed]
    agl_sse = sum(t.agl_sse for t in tiles)
    flow_sse = sum(t.flow_sse for t in tiles)
    n_scored = sum(t.n_scored for t in tiles)
    if failures:
        agl_r2 = flow_r2 = score = 0.0
    else:
        agl_r2 = 1.0 - agl_sse / (agl.challenge_total() + EPS)
        flow_r2 = 1.0 - flow_sse / (flow.challenge_total() + EPS)
        score = (agl_r2 + flow_r2) / 2.0
    angle_errs = np.degrees([t.angle_err for t in tiles if t.failed is None])
    scale_errs = [t.scale_err for t in tiles if t.failed is None]
    return CityScore(
        city=city,
        tiles=len(tiles),
        pixels=int(agl.n),
        agl_r2=agl_r2,
        flow_r2=flow_r2,
        score=score,
        angle_err_mean_deg=float(np.mean(angle_errs)) if angle_errs.size else math.nan,
        angle_err_rms_deg=float(np.sqrt(np.mean(angle_errs**2))) if angle_errs.size else math.nan,
        scale_err_mean=float(np.mean(scale_errs)) if scale_errs else math.nan,
        agl_rmse_m=math.sqrt(agl_sse / n_scored) if n_scored else math.nan,
        epe_rmse_px=math.sqrt(flow_sse / n_scored) if n_scored else math.nan,
        failures=failures,
    )


def score_report(tiles: Iterable[TileStats]) -> ScoreReport:
    """Score tiles of any cities: per city pooled, final = mean over the cities present."""
    by_city: dict[str, list[TileStats]] = {}
    for t in tiles:
        by_city.setdefault(t.city, []).append(t)
    cities = {c: city_score(c, ts) for c, ts in sorted(by_city.items())}
    # A city whose tiles hold no valid truth pixel has no truth: it is reported but left out of the mean.
    present = [c.score for c in cities.values() if c.pixels > 0]
    final = float(np.mean(present)) if present else math.nan
    return ScoreReport(final, cities)


def format_report(report: ScoreReport) -> str:
    """A terminal table of a report."""
    head = (
        f"{'city':<5}{'tiles':>7}{'score':>9}{'AGL R²':>9}{'flow R²':>9}{'angle°':>9}"
        f"{'rms°':>8}{'scale':>9}{'AGL m':>8}{'EPE px':>8}"
    )
    lines = [head]
    for c in report.cities.values():
        lines.append(
            f"{c.city:<5}{c.tiles:>7}{c.score:>9.4f}{c.agl_r2:>9.4f}{c.flow_r2:>9.4f}"
            f"{c.angle_err_mean_deg:>9.2f}{c.angle_err_rms_deg:>8.2f}{c.scale_err_mean:>9.4f}"
            f"{c.agl_rmse_m:>8.3f}{c.epe_rmse_px:>8.3f}"
        )
        for f in c.failures[:5]:
            lines.append(f"      scored 0: {f}")
        if len(c.failures) > 5:
            lines.append(f"      ... and {len(c.failures) - 5} more unusable predictions")
    present = sum(c.pixels > 0 for c in report.cities.values())
    lines.append(f"final score (mean of {present} cities with truth): {report.score:.6f}")
    return "\n".join(lines)

"""The order in which a grid's configurations start: guided by what the first rung has shown so far.

A grid of encoder × decoder × learning rate × accumulation is a product of a few categorical axes, and the
screening scores at the first rung are close to additive in them: a good encoder is good with most decoders, and
most pairs share a good learning-rate range. :class:`GuidedOrder` starts the grid's configurations in an order
that uses this, so the configurations likely to be best start (and so finish) early, and every configuration
still starts: the grid is not pruned, only reordered.

- **Cover first.** Until every level of every axis has been started ``cover`` times, the next configuration is
  the one whose levels have been started least (ties broken by the seeded generator).
- **Then Thompson sampling** on a Bayesian additive model of the first-rung scores: one-hot levels of every
  axis, a N(0, 1) prior per level, unit noise. The scores are replaced by their normal scores (ranks mapped
  through the normal quantile), so a collapsed run (a score of 0.3 among 0.8s) is one low rank, not an outlier
  that drags the fit. A configuration that failed before the first rung counts as the lowest rank. Each pick
  draws one set of weights from the posterior and starts the not-yet-started configuration they score highest:
  promising levels are tried more, uncertain ones still get tried.

Pure Python and numpy: the sweep driver wraps it as a Ray Tune searcher (:mod:`geopose_ray.cluster.search`), the
simulator calls it directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.linalg import cho_solve, cholesky, solve_triangular
from scipy.special import ndtri
from scipy.stats import rankdata

from geopose_ray.errors import ConfigError


class GuidedOrder:
    """Hands out the indices of ``configs`` one at a time, every index exactly once (see the module docstring).

    ``axes`` are the keys whose values define the levels (default: every key whose value differs between
    configurations). :meth:`observe` takes a configuration's first-rung score (None or non-finite: it failed
    before the first rung); higher is better.
    """

    def __init__(
        self,
        configs: Sequence[Mapping[str, Any]],
        axes: Sequence[str] | None = None,
        seed: int = 0,
        cover: int = 1,
    ) -> None:
        if not configs:
            raise ConfigError("A guided order needs at least one configuration")
        if cover < 0:
            raise ConfigError(f"The value of `cover` is {cover}, but must be `cover >= 0`")
        keys = sorted(set().union(*(c.keys() for c in configs)))
        if axes is None:
            axes = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
        self.axes = list(axes)
        levels: dict[tuple[str, str], int] = {}
        rows = []
        for c in configs:
            row = []
            for a in self.axes:
                level = (a, repr(c.get(a)))
                row.append(levels.setdefault(level, len(levels)))
            rows.append(row)
        self.levels = len(levels)
        self.x = np.zeros((len(configs), max(self.levels, 1)))
        for i, row in enumerate(rows):
            self.x[i, row] = 1.0
        self.rng = np.random.default_rng(seed)
        self.cover = cover
        self.started = np.zeros(len(configs), dtype=bool)
        self.counts = np.zeros(self.x.shape[1])
        self.xtx = np.eye(self.x.shape[1])  # the posterior precision: the observed rows' X^T X + the N(0, 1) prior
        self._posterior: tuple[np.ndarray, np.ndarray] | None = None  # (mean, lower Cholesky factor of precision)
        self.scores: dict[int, float] = {}  # index -> first-rung score (-inf: failed before it)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def remaining(self) -> int:
        return int((~self.started).sum())

    def observe(self, index: int, score: float | None) -> None:
        """The first-rung score of configuration ``index`` (None or NaN: it failed before the first rung)."""
        if not 0 <= index < len(self):
            raise ConfigError(f"No configuration {index} in a grid of {len(self)}")
        if score is None or not math.isfinite(score):
            score = -math.inf
        if index not in self.scores:
            self.xtx += np.outer(self.x[index], self.x[index])
        self.scores[index] = float(score)
        self._posterior = None

    def next(self) -> int | None:
        """The next configuration to start, or None when every one has started."""
        left = np.flatnonzero(~self.started)
        if left.size == 0:
            return None
        level_counts = self.x[left] @ self.counts
        if self.counts.min() < self.cover or len(self.scores) < 2:
            pick = left[self._argmin_random(level_counts)]
        else:
            pick = left[int(np.argmax(self.x[left] @ self._draw_weights()))]
        self.started[pick] = True
        self.counts += self.x[pick]
        return int(pick)

    def _argmin_random(self, values: np.ndarray) -> int:
        low = np.flatnonzero(values <= values.min() + 1e-9)
        return int(self.rng.choice(low))

    def _draw_weights(self) -> np.ndarray:
        """One draw from the posterior of the additive model on the normal scores of the observed ranks."""
        if self._posterior is None:  # unit noise, N(0, 1) prior per level
            idx = np.fromiter(self.scores, dtype=int)
            y = _normal_scores(np.array([self.scores[i] for i in idx]))
            chol = cholesky(self.xtx, lower=True)
            self._posterior = cho_solve((chol, True), np.einsum("ij,i->j", self.x[idx], y)), chol
        mean, chol = self._posterior
        # precision = L Lᵀ, so w = mean + L⁻ᵀ z has covariance precision⁻¹.
        return mean + solve_triangular(chol.T, self.rng.standard_normal(len(mean)), lower=False)


def _normal_scores(values: np.ndarray) -> np.ndarray:
    """Ranks (ties averaged, -inf lowest) mapped through the standard normal quantile at (r − ½) / n."""
    return ndtri((rankdata(values) - 0.5) / len(values))


def longest_first(costs: Sequence[float]) -> list[int]:
    """The order to start a batch of long jobs in on a pool of workers, as indices into ``costs`` (each job's
    hours, or hours per epoch when all train the same epochs): the most expensive first (the
    longest-processing-time rule), unknown costs (NaN) last, equal costs in their given order. Why, and what it
    does for the fold runs: docs/benchmarks/sweep-fold-runs.md."""
    return sorted(range(len(costs)), key=lambda i: (costs[i] != costs[i], -costs[i] if costs[i] == costs[i] else 0))


PREEMPT_RATIO = 1.5  # a margin: a run nearly done keeps its worker against one only a little longer


def pre_empts(cost: float, hours_left: float, waiting: Iterable[tuple[float, float]]) -> bool:
    """Whether a running fold run (its architecture's hours per epoch, its hours left) gives up its worker at
    an epoch's end to a waiting one (``waiting``: the same pair for each): to one of a costlier architecture with
    more than :data:`PREEMPT_RATIO` times its hours left. The run that yields keeps its epochs and waits; the
    worker goes to the waiting run with the most hours left (docs/sweeps.md, pre-emption). Runs of
    equally costly architectures never pre-empt each other, so a finalist's runs are not interleaved with its
    peers' and restarts stay few; an unknown cost (NaN) pre-empts nothing and is never pre-empted."""
    return any(c > cost and left > PREEMPT_RATIO * hours_left for c, left in waiting)

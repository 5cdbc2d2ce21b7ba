"""Bootstrap 95 % intervals over evaluation items (seeded, percentile method).

An accuracy is the mean of per-item hits; a perplexity is exp(summed NLL / summed tokens) over the
items, so a resample draws items (with their token counts) and recomputes the token-weighted mean NLL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
"""Coverage of every interval."""


@dataclass(frozen=True)
class Interval:
    """A metric's value, its bootstrap interval and the number of items behind it."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] item indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _bounds(stats: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], *, resamples: int, seed: int) -> Interval:
    """The mean of per-item values (hits as 0/1 for an accuracy) and its bootstrap interval.

    Raises:
        ValueError: no values, or fewer than 1 resample.
    """
    if not values:
        raise ValueError("no items to bootstrap over")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    x = np.asarray(values, dtype=np.float64)
    stats = x[_resample_indices(len(x), resamples, seed)].mean(axis=1)
    low, high = _bounds(stats)
    value = float(x.mean())
    return Interval(value, min(low, value), max(high, value), len(x))


def perplexity_interval(nll: Sequence[float], tokens: Sequence[int], *, resamples: int, seed: int) -> Interval:
    """Token-level perplexity exp(sum nll / sum tokens) over items, and its bootstrap interval over items.

    Args:
        nll: summed negative log-likelihood of each item's predicted tokens.
        tokens: each item's number of predicted tokens (items with 0 carry no weight).

    Raises:
        ValueError: no items, mismatched lengths, or no predicted token at all.
    """
    if not nll or len(nll) != len(tokens):
        raise ValueError(f"need one token count per item and at least one item, got {len(nll)} and {len(tokens)}")
    s, t = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if t.sum() <= 0:
        raise ValueError("no predicted token in any item")
    idx = _resample_indices(len(s), resamples, seed)
    sums, counts = s[idx].sum(axis=1), t[idx].sum(axis=1)
    ok = counts > 0  # a resample of only empty items has no perplexity: left out
    stats = np.exp(sums[ok] / counts[ok])
    value = math.exp(float(s.sum() / t.sum()))
    low, high = _bounds(stats) if ok.any() else (value, value)
    return Interval(value, min(low, value), max(high, value), len(s))


def overlap(a: Interval, b: Interval) -> bool:
    """Whether two intervals share any point (then the difference is not clear at this n)."""
    return a.low <= b.high and b.low <= a.high

"""Bootstrap 95 % intervals over evaluation items (seeded, percentile method).

An accuracy is the mean of per-item hits; a perplexity is exp(summed NLL / summed tokens) over the
items, so a resample draws items (with their token counts) and recomputes the token-weighted mean NLL.

Two models scored on the same items compare by a *paired* bootstrap (`paired_perplexity_ratio`,
`paired_mean_difference`): each resample draws one set of item indices and recomputes both models'
metric on it, so the item-to-item variation the two share cancels out of the ratio / difference. Two
models whose separate intervals touch can still differ clearly when paired.
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


def perplexity_interval(
    nll: Sequence[float], tokens: Sequence[int], *, resamples: int, seed: int
) -> Interval:
    """Token-level perplexity exp(sum nll / sum tokens) over items, and its bootstrap interval over items.

    Args:
        nll: summed negative log-likelihood of each item's predicted tokens.
        tokens: each item's number of predicted tokens (items with 0 carry no weight).

    Raises:
        ValueError: no items, mismatched lengths, or no predicted token at all.
    """
    if not nll or len(nll) != len(tokens):
        raise ValueError(
            f"need one token count per item and at least one item, got {len(nll)} and {len(tokens)}"
        )
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


def _paired_count(a: Sequence[float], b: Sequence[float], what: str) -> int:
    """The common item count of two models' per-item values; refuses different counts or none."""
    if len(a) != len(b):
        raise ValueError(
            f"paired {what}: model A has {len(a)} items and model B {len(b)}; a paired comparison needs both "
            "models' values on the same items, in the same order"
        )
    if not a:
        raise ValueError(f"paired {what}: no items to bootstrap over")
    return len(a)


def paired_mean_difference(
    values_a: Sequence[float], values_b: Sequence[float], *, resamples: int, seed: int
) -> Interval:
    """mean(A) - mean(B) over the same items (hits as 0/1 for an accuracy), with a paired bootstrap interval.

    Every resample draws one set of item indices (`_resample_indices`, the draw `mean_interval` makes with
    the same seed) and takes both means on it.

    Raises:
        ValueError: different item counts, no items, or fewer than 1 resample.
    """
    n = _paired_count(values_a, values_b, "mean difference")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    idx = _resample_indices(n, resamples, seed)
    stats = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    value = float(a.mean() - b.mean())
    low, high = _bounds(stats)
    return Interval(value, min(low, value), max(high, value), n)


def paired_perplexity_ratio(
    nll_a: Sequence[float],
    tokens_a: Sequence[int],
    nll_b: Sequence[float],
    tokens_b: Sequence[int],
    *,
    resamples: int,
    seed: int,
) -> Interval:
    """ppl(A) / ppl(B) over the same items (each as `perplexity_interval` computes it), with a paired
    bootstrap interval: every resample draws one set of item indices and recomputes both perplexities on it.

    Args:
        nll_a, tokens_a: model A's summed NLL and predicted-token count per item.
        nll_b, tokens_b: model B's, item for item the same items.

    Raises:
        ValueError: a model's NLL and token lists differ in length, the models' item counts differ, no
            items, fewer than 1 resample, or a model has no predicted token at all.
    """
    for name, nll, tokens in (("A", nll_a, tokens_a), ("B", nll_b, tokens_b)):
        if len(nll) != len(tokens):
            raise ValueError(
                f"paired perplexity ratio: model {name} has {len(nll)} NLLs but {len(tokens)} token counts"
            )
    n = _paired_count(nll_a, nll_b, "perplexity ratio")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    sa, ta = np.asarray(nll_a, dtype=np.float64), np.asarray(tokens_a, dtype=np.float64)
    sb, tb = np.asarray(nll_b, dtype=np.float64), np.asarray(tokens_b, dtype=np.float64)
    if ta.sum() <= 0 or tb.sum() <= 0:
        raise ValueError("paired perplexity ratio: no predicted token in any item of one model")
    idx = _resample_indices(n, resamples, seed)
    counts_a, counts_b = ta[idx].sum(axis=1), tb[idx].sum(axis=1)
    ok = (counts_a > 0) & (counts_b > 0)  # a resample of only empty items has no perplexity: left out
    stats = np.exp(sa[idx].sum(axis=1)[ok] / counts_a[ok] - sb[idx].sum(axis=1)[ok] / counts_b[ok])
    value = math.exp(float(sa.sum() / ta.sum()) - float(sb.sum() / tb.sum()))
    low, high = _bounds(stats) if ok.any() else (value, value)
    return Interval(value, min(low, value), max(high, value), n)


def excludes(interval: Interval, null: float) -> bool:
    """Whether the interval lies wholly on one side of `null` (1 for a ratio, 0 for a difference)."""
    return interval.low > null or interval.high < null

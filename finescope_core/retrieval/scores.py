"""The canonical seed score (max-over-seeds cosine, or another `SeedPooling`) and the input handling
every retrieval path shares.

Every score retrieval returns is computed one way (`exact_scores`: a float64 sum of the exact
products of the float32-normalised vectors, one row at a time), so equal rows get equal scores
wherever they sit and the FAISS search and the brute-force reference agree bit for bit. Faster
float32 kernels (FAISS, BLAS) are used only to find candidates, trusted up to `score_tolerance`.
Rows with a zero vector score 0 (never NaN). Ties are broken by a per-row priority when one is given
(`tie_priority`: a seeded hash of each record's id, so the order does not depend on where a record
sits in the corpus), else by lower row index (`select_top`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Matrix = np.ndarray | torch.Tensor

_CHUNK_ELEMENTS = 1 << 21  # float64 values per rescoring chunk (16 MiB)


class RetrievalInputError(ValueError):
    """Codes, seeds, masks or selections that retrieval cannot use; the message names the input."""


def as_float32_matrix(x: Matrix, name: str) -> np.ndarray:
    """A C-contiguous float32 [n, d] numpy view or copy of `x` (numpy array or torch tensor)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise RetrievalInputError(f"{name} must be a 2-D matrix [rows, dim], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise RetrievalInputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _safe_norms(x: np.ndarray, name: str, ignore: np.ndarray | None = None) -> np.ndarray:
    """Row L2 norms of `x` [n, d] as divisors: zero norms become 1 so zero rows stay zero.

    einsum reduces each row with the same code path whatever the matrix around it, so a row's
    norm does not depend on which other rows are present.

    Args:
        x: [n, d] float32, C-contiguous.
        name: what `x` is, for error messages.
        ignore: optional bool [n]; rows that will not be used (their values are not checked).

    Returns:
        [n] float32.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = ~np.isfinite(norms)
    if ignore is not None:
        bad &= ~ignore
    if bad.any():
        rows = np.flatnonzero(bad)
        raise RetrievalInputError(
            f"{name} row {int(rows[0])} has non-finite values (or a norm beyond float32 range); "
            f"{rows.size} such rows in all. Fix, drop or exclude them before retrieval."
        )
    return np.where(norms > 0, norms, np.float32(1.0))


def l2_normalise(
    x: np.ndarray, name: str, rows: np.ndarray | None = None, ignore: np.ndarray | None = None
) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm (zero rows stay zero), in one new array.

    Args:
        x: [n, d] float32, C-contiguous.
        name: what `x` is, for error messages.
        rows: optional [k] row indices to keep (in this order); None: all rows.
        ignore: optional bool [n]; rows whose values are not checked (e.g. excluded ones).

    Returns:
        [n, d] or [k, d] float32.
    """
    norms = _safe_norms(x, name, ignore)
    out: np.ndarray
    if rows is None:
        out = x / norms[:, None]
        return out
    out = x[rows]  # the gather is the only copy of the corpus; divide in place
    out /= norms[rows, None]
    return out


def normalised_seeds(seeds: Matrix, dim: int, name: str = "seeds") -> np.ndarray:
    """L2-normalised seed codes [S, d]; a seed with a zero vector is an error (it has no direction)."""
    s = as_float32_matrix(seeds, name)
    if s.shape[0] == 0:
        raise RetrievalInputError(f"{name} is empty; give at least one seed code")
    if s.shape[1] != dim:
        raise RetrievalInputError(f"{name} have dimension {s.shape[1]} but the corpus codes have {dim}")
    s_n = l2_normalise(s, name)
    zero = np.flatnonzero(~s_n.any(axis=1))
    if zero.size:
        raise RetrievalInputError(
            f"{name} row(s) {zero.tolist()} are all-zero codes, so their cosine is undefined; "
            "drop those seeds or use a layer whose codes are non-zero for them"
        )
    return s_n


SeedPoolingKind = Literal["max", "mean", "softmax"]


@dataclass(frozen=True)
class SeedPooling:
    """How one row's cosines to the S seeds become its score (`curate.seed_pooling`).

    `max`: the nearest seed (paper eq. 12); `mean`: the mean cosine; `softmax`: the smooth maximum
    tau * log(mean_s exp(c_s / tau)), which lies between the two (max - tau * log S <= it <= max).
    Each is 1-Lipschitz in the largest change of one cosine, so a score computed from cosines that
    are each off by at most t is off by at most t: the rounding bound of the float32 kernels
    (`score_tolerance`) certifies every pooled score as it does the maximum.

    The seeds are pooled one after the other in their order, elementwise over the rows, so a row's
    score depends only on its own cosines, never on the other rows of the batch.
    """

    kind: SeedPoolingKind = "max"
    temperature: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("max", "mean", "softmax"):
            raise RetrievalInputError(f"unknown seed pooling {self.kind!r}; choose max, mean or softmax")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise RetrievalInputError(f"the softmax temperature must be > 0, got {self.temperature}")

    def __call__(self, sims: np.ndarray) -> np.ndarray:
        """[n, S] cosines -> [n] float64 scores."""
        cols = [np.asarray(sims[:, j], dtype=np.float64) for j in range(sims.shape[1])]
        if not cols:
            raise RetrievalInputError("no seeds to pool; give at least one seed")
        top = cols[0].copy()
        for c in cols[1:]:
            np.maximum(top, c, out=top)
        if self.kind == "max":
            return top
        acc = np.zeros_like(top)
        for c in cols:
            acc += c if self.kind == "mean" else np.exp((c - top) / self.temperature)
        if self.kind == "mean":
            return acc / len(cols)
        out: np.ndarray = top + self.temperature * np.log(acc / len(cols))
        return out


MAX = SeedPooling()
"""The paper's rule (eq. 12): every retrieval function's default."""


def exact_similarities(rows_n: np.ndarray, seeds_n: np.ndarray) -> np.ndarray:
    """Canonical cosines of each row with each seed: float64 sums of exact float32 products.

    Each (row, seed) value is numpy's pairwise sum over the same contiguous d products (exact in
    float64), so it depends only on the two vectors, never on the batch shape (unlike BLAS kernels).

    Args:
        rows_n: [n, d] float32, L2-normalised.
        seeds_n: [S, d] float32, L2-normalised.

    Returns:
        [n, S] float64.
    """
    seeds64 = seeds_n.astype(np.float64)
    out = np.empty((rows_n.shape[0], seeds_n.shape[0]))
    step = max(1, _CHUNK_ELEMENTS // max(1, rows_n.shape[1]))
    for start in range(0, rows_n.shape[0], step):
        chunk = rows_n[start : start + step].astype(np.float64)
        for j, seed in enumerate(seeds64):
            out[start : start + step, j] = (chunk * seed).sum(axis=1)
    return out


def exact_scores(rows_n: np.ndarray, seeds_n: np.ndarray, pooling: SeedPooling = MAX) -> np.ndarray:
    """Canonical score of each row: `pooling` of its canonical cosines (`exact_similarities`).

    Args:
        rows_n: [n, d] float32, L2-normalised.
        seeds_n: [S, d] float32, L2-normalised.
        pooling: how the S cosines become one score (default: their maximum, eq. 12).

    Returns:
        [n] float64.
    """
    return pooling(exact_similarities(rows_n, seeds_n))


def score_tolerance(dim: int) -> float:
    """Bound on |BLAS/FAISS float32 inner product - canonical score| for unit vectors of length dim.

    gamma_d = d*u/(1-d*u) with u = 2^-24 bounds any summation order (blocked, SIMD, FMA); the
    factor 2 covers the norms of float32-normalised vectors differing from 1 and the float64 sum.
    """
    return 2.0 * (dim + 2) * 2.0**-24


def tie_priority(ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """Per-row tie-break priority: a seeded 64-bit hash of each record id (lower wins a tie).

    The priority follows the record, not its row, so a permuted corpus breaks ties the same way; the
    seed varies which of several tied records wins without favouring early rows.

    Args:
        ids: one id per corpus row (ids are unique within a corpus).
        seed: the run's seed, mixed into the hash.

    Returns:
        [N] uint64.
    """
    salt = f"finescope-tie:{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + str(i).encode(), digest_size=8).digest(), "big") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


def select_top(
    rows: np.ndarray, scores: np.ndarray, m: int, priority: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The m best (rows, scores), ordered by score desc, then `priority[row]` asc (if given), then row asc.

    Args:
        rows: [n] row indices (into `priority` when given).
        scores: [n] their scores.
        m: how many to keep.
        priority: optional [N] per-row tie-break key (`tie_priority`), indexed by `rows`.
    """
    keys = (rows, -scores) if priority is None else (rows, priority[rows], -scores)
    order = np.lexsort(keys)[:m]
    return rows[order].astype(np.int64), scores[order]

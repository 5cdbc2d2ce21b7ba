"""Exact top-M by max-over-seeds cosine (paper eq. 12-13), and the brute-force reference that checks it.

s(x) = max over seeds t of cos(z(x), z(t)). `topm_max_over_seeds` asks FAISS for each seed's nearest
neighbours (inner product on L2-normalised rows) and rescores only the union of those lists: a row
in the global top-m reaches its score through one seed, and if it were missing from that seed's
top-k list (k >= m) there would be m rows scoring at least as high. Floating-point rounding and
ties are handled by certification, not by hope: FAISS scores are trusted only up to the textbook
bound |fl(x.y) - x.y| <= gamma_d |x||y| (`scores.score_tolerance`), and the search is widened until
every seed's k-th neighbour lies provably below the m-th best score, so no tie or near-tie outside
the lists can belong to the top m. Every returned score is the canonical one (`scores.exact_scores`).

Other seed poolings (`scores.SeedPooling`: the mean, or a smooth maximum) score a row by all its
seed cosines, so no per-seed list bounds them; they take the float32 [N, S] cosine matrix from BLAS
(the same arithmetic FAISS's exhaustive search does), pool it, and rescore canonically every row
within twice the rounding bound of the m-th pooled score. Pooling is 1-Lipschitz in the cosines, so
the bound carries over and the result is exact in the same sense.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch

from finescope_core.retrieval.scores import (
    MAX,
    Matrix,
    RetrievalInputError,
    SeedPooling,
    as_float32_matrix,
    exact_scores,
    l2_normalise,
    normalised_seeds,
    score_tolerance,
    select_top,
)


def _check_m(m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise RetrievalInputError(f"m must be a positive integer (rows to select), got {m!r}")


def _exclude_mask(exclude: np.ndarray | torch.Tensor | None, n: int) -> np.ndarray:
    """The exclusion mask as a bool [n] array (all False when None)."""
    if exclude is None:
        return np.zeros(n, dtype=bool)
    mask = exclude.detach().cpu().numpy() if isinstance(exclude, torch.Tensor) else np.asarray(exclude)
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise RetrievalInputError(
            f"exclude must be a boolean mask of shape ({n},) (one flag per corpus row), "
            f"got dtype {mask.dtype} and shape {mask.shape}"
        )
    return mask


def _check_priority(priority: np.ndarray | None, n: int) -> np.ndarray | None:
    """The tie-break priority as a [n] integer array, or None."""
    if priority is None:
        return None
    arr = np.asarray(priority)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise RetrievalInputError(
            f"priority must be an integer array of shape ({n},) (one tie-break key per corpus row), "
            f"got dtype {arr.dtype} and shape {arr.shape}"
        )
    return arr


def _check_threads(threads: int | None) -> None:
    """Raise before any work when the FAISS thread count cannot be used."""
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise RetrievalInputError(f"threads must be >= 1 (or None for every available CPU), got {threads!r}")


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with `threads` OpenMP threads (None: the CPUs this process may use), then restore."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads if threads is not None else _available_cpus())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _candidate_k(m: int, n: int) -> int:
    """Neighbours asked per seed: m plus slack, so the k-th usually sits clear of the m-th score."""
    return min(n, m + max(16, m // 8))


def _flat_topm(
    corpus_n: np.ndarray, seeds_n: np.ndarray, m: int, priority: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-m local rows by max-over-seeds score, certified against rounding and ties.

    Args:
        corpus_n: [n, d] float32 normalised rows (excluded rows already removed), n > m.
        seeds_n: [S, d] float32 normalised seeds.
        m: rows to return.
        priority: optional [n] tie-break key of the local rows (`scores.tie_priority`).

    Returns:
        ([m] local row indices, [m] canonical scores), best first.
    """
    n = corpus_n.shape[0]
    tol = score_tolerance(corpus_n.shape[1])
    k = _candidate_k(m, n)
    while True:
        # faiss.knn is IndexFlatIP's exhaustive kernel without copying the corpus into an index.
        sims, ids = faiss.knn(seeds_n, corpus_n, k, metric=faiss.METRIC_INNER_PRODUCT)
        candidates = np.unique(ids)
        rows, scores = select_top(candidates, exact_scores(corpus_n[candidates], seeds_n), m, priority)
        # A row outside every list scores at most max_s(k-th similarity of seed s) + tol.
        if k == n or float(sims[:, -1].max()) + tol < float(scores[-1]):
            return rows, scores
        k = min(n, 2 * k)


def topm_max_over_seeds(
    corpus: Matrix,
    seeds: Matrix,
    m: int,
    *,
    exclude: np.ndarray | torch.Tensor | None = None,
    threads: int | None = None,
    priority: np.ndarray | None = None,
    pooling: SeedPooling = MAX,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 12-13: the exact m corpus rows with the highest max-over-seeds cosine, via FAISS (or the
    highest pooled score under another `pooling`, via BLAS: see the module docstring).

    Equal, bit for bit, to `brute_force_topm`; only faster on a large corpus.

    Args:
        corpus: [N, d] codes (numpy or torch). Zero rows score 0.
        seeds: [S, d] seed codes. A zero seed is an error.
        m: rows to select; fewer come back when fewer than m rows are not excluded.
        exclude: optional bool [N]; True rows are never selected (seed copies, duplicates).
        threads: FAISS threads for this call (restored afterwards); None: all CPUs available.
        priority: optional [N] tie-break key per corpus row (`scores.tie_priority`); ties in score
            go to the lower priority, then the lower row. Every row tied with the m-th score is
            among the rescored candidates (the certification above), so the choice is exact.
        pooling: how a row's seed cosines become its score (default: the maximum, eq. 12).

    Returns:
        (idx [m'] int64 corpus rows, score [m'] float64), by score desc then priority asc then row asc;
        m' = min(m, N - excluded).
    """
    _check_m(m)
    _check_threads(threads)
    x = as_float32_matrix(corpus, "corpus")
    priority = _check_priority(priority, x.shape[0])
    seeds_n = normalised_seeds(seeds, x.shape[1])
    mask = _exclude_mask(exclude, x.shape[0])
    kept = np.flatnonzero(~mask)
    corpus_n = l2_normalise(x, "corpus", rows=kept if mask.any() else None, ignore=mask)
    n = corpus_n.shape[0]
    if n == 0:
        return _empty()
    local_priority = priority[kept] if priority is not None and mask.any() else priority
    if n <= m:
        rows, scores = select_top(np.arange(n), exact_scores(corpus_n, seeds_n, pooling), n, local_priority)
        return kept[rows], scores
    if pooling.kind != "max":
        rows, scores = _pooled_topm(corpus_n, seeds_n, m, pooling, local_priority)
        return kept[rows], scores
    with _faiss_threads(threads):
        rows, scores = _flat_topm(corpus_n, seeds_n, m, local_priority)
    return kept[rows], scores


def _pooled_topm(
    corpus_n: np.ndarray,
    seeds_n: np.ndarray,
    m: int,
    pooling: SeedPooling,
    priority: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-m local rows by pooled score: BLAS cosines pooled, candidates within 2 x tolerance rescored.

    Args: as `_flat_topm` (every row of `corpus_n` usable), with the `pooling`.
    """
    approx = pooling(corpus_n @ seeds_n.T)
    threshold = np.partition(approx, approx.size - m)[approx.size - m]
    candidates = np.flatnonzero(approx >= threshold - 2 * score_tolerance(corpus_n.shape[1]))
    return select_top(candidates, exact_scores(corpus_n[candidates], seeds_n, pooling), m, priority)


def brute_force_topm(
    corpus: Matrix,
    seeds: Matrix,
    m: int,
    *,
    exclude: np.ndarray | torch.Tensor | None = None,
    priority: np.ndarray | None = None,
    pooling: SeedPooling = MAX,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference for `topm_max_over_seeds`: the full [N, S] cosine matrix with numpy.

    The float32 BLAS matrix picks every row within the rounding tolerance of the m-th best score;
    those rows are rescored canonically, so ties and near-ties resolve exactly as in the FAISS path.

    Args:
        corpus: [N, d] codes (numpy or torch).
        seeds: [S, d] seed codes.
        m: rows to select.
        exclude: optional bool [N]; True rows are never selected.
        priority: optional [N] tie-break key per row, as in `topm_max_over_seeds`.
        pooling: as in `topm_max_over_seeds`.

    Returns:
        (idx [m'] int64, score [m'] float64), by score desc then priority asc then row asc;
        m' = min(m, N - excluded).
    """
    _check_m(m)
    x = as_float32_matrix(corpus, "corpus")
    priority = _check_priority(priority, x.shape[0])
    seeds_n = normalised_seeds(seeds, x.shape[1])
    mask = _exclude_mask(exclude, x.shape[0])
    corpus_n = l2_normalise(x, "corpus", ignore=mask)
    approx = pooling(corpus_n @ seeds_n.T)
    approx[mask] = -np.inf
    keep = int((~mask).sum())
    if keep == 0:
        return _empty()
    mm = min(m, keep)
    threshold = np.partition(approx, approx.size - mm)[approx.size - mm]
    candidates = np.flatnonzero(approx >= threshold - 2 * score_tolerance(x.shape[1]))
    return select_top(candidates, exact_scores(corpus_n[candidates], seeds_n, pooling), mm, priority)

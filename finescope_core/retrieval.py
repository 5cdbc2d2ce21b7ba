"""Retrieval (paper eq. 12-13): the top-M corpus rows by max-over-seeds cosine, and the vote across layers.

s(x) = max over seeds t of cos(z(x), z(t)). The exact path asks FAISS for each seed's nearest
neighbours (inner product on L2-normalised rows) and rescores only the union of those lists: a row
in the global top-m reaches its score through one seed, and if it were missing from that seed's
top-k list (k >= m) there would be m rows scoring at least as high. Floating-point rounding and
ties are handled by certification, not by hope:

* every returned score is computed in one canonical way (float64 sum of the exact products of the
  float32-normalised vectors, one row at a time), so equal rows get equal scores wherever they sit
  and `topm_max_over_seeds` and `brute_force_topm` agree bit for bit;
* FAISS and BLAS scores are trusted only up to the textbook bound |fl(x.y) - x.y| <= gamma_d |x||y|
  (`_score_tolerance`), and the search is widened until every seed's k-th neighbour lies provably
  below the m-th best score, so no tie or near-tie outside the lists can belong to the top m.

Ties in score are broken by lower row index. Rows with a zero vector score 0 (never NaN).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

Matrix = np.ndarray | torch.Tensor

_CHUNK_ELEMENTS = 1 << 21  # float64 values per rescoring chunk (16 MiB)


class RetrievalInputError(ValueError):
    """Codes, seeds, masks or selections that retrieval cannot use; the message names the input."""


@dataclass
class LayerSelection:
    """One layer's top-M choice (eq. 13).

    Attributes:
        layer: decoder layer index the codes came from.
        rows: [M] corpus row indices, best first.
        scores: [M] their max-over-seeds cosine in that layer's code space.
    """

    layer: int
    rows: np.ndarray
    scores: np.ndarray


@dataclass
class VotedRecord:
    """A corpus row after the vote across layers.

    Attributes:
        row: corpus row index.
        votes: number of layers that selected it, or the sum of their weights.
        mean_score: mean score over the layers that selected it (unweighted).
        layers: the layers that selected it, ascending.
    """

    row: int
    votes: float
    mean_score: float
    layers: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# input handling and the canonical score


def _as_float32_matrix(x: Matrix, name: str) -> np.ndarray:
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


def _l2_normalise(
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
    if rows is None:
        return x / norms[:, None]
    out = x[rows]  # the gather is the only copy of the corpus; divide in place
    out /= norms[rows, None]
    return out


def _normalised_seeds(seeds: Matrix, dim: int, name: str = "seeds") -> np.ndarray:
    """L2-normalised seed codes [S, d]; a seed with a zero vector is an error (it has no direction)."""
    s = _as_float32_matrix(seeds, name)
    if s.shape[0] == 0:
        raise RetrievalInputError(f"{name} is empty; give at least one seed code")
    if s.shape[1] != dim:
        raise RetrievalInputError(f"{name} have dimension {s.shape[1]} but the corpus codes have {dim}")
    s_n = _l2_normalise(s, name)
    zero = np.flatnonzero(~s_n.any(axis=1))
    if zero.size:
        raise RetrievalInputError(
            f"{name} row(s) {zero.tolist()} are all-zero codes, so their cosine is undefined; "
            "drop those seeds or use a layer whose codes are non-zero for them"
        )
    return s_n


def _exact_scores(rows_n: np.ndarray, seeds_n: np.ndarray) -> np.ndarray:
    """Canonical max-over-seeds cosine of each row: float64 sums of exact float32 products.

    Each (row, seed) value is numpy's pairwise sum over the same contiguous d products (exact in
    float64), so it depends only on the two vectors, never on the batch shape (unlike BLAS kernels).

    Args:
        rows_n: [n, d] float32, L2-normalised.
        seeds_n: [S, d] float32, L2-normalised.

    Returns:
        [n] float64.
    """
    seeds64 = seeds_n.astype(np.float64)
    out = np.full(rows_n.shape[0], -np.inf)
    step = max(1, _CHUNK_ELEMENTS // max(1, rows_n.shape[1]))
    for start in range(0, rows_n.shape[0], step):
        chunk = rows_n[start : start + step].astype(np.float64)
        for seed in seeds64:
            np.maximum(out[start : start + step], (chunk * seed).sum(axis=1), out=out[start : start + step])
    return out


def _score_tolerance(dim: int) -> float:
    """Bound on |BLAS/FAISS float32 inner product - canonical score| for unit vectors of length dim.

    gamma_d = d*u/(1-d*u) with u = 2^-24 bounds any summation order (blocked, SIMD, FMA); the
    factor 2 covers the norms of float32-normalised vectors differing from 1 and the float64 sum.
    """
    return 2.0 * (dim + 2) * 2.0**-24


def _select(rows: np.ndarray, scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m best (rows, scores), ordered by score desc then row asc."""
    order = np.lexsort((rows, -scores))[:m]
    return rows[order].astype(np.int64), scores[order]


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


def _check_threads(threads: int | None) -> None:
    """Raise before any work when the FAISS thread count cannot be used."""
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise RetrievalInputError(f"threads must be >= 1 (or None for every available CPU), got {threads!r}")


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# FAISS search


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


def _flat_topm(corpus_n: np.ndarray, seeds_n: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-m local rows by max-over-seeds score, certified against rounding and ties.

    Args:
        corpus_n: [n, d] float32 normalised rows (excluded rows already removed), n > m.
        seeds_n: [S, d] float32 normalised seeds.
        m: rows to return.

    Returns:
        ([m] local row indices, [m] canonical scores), best first.
    """
    n = corpus_n.shape[0]
    tol = _score_tolerance(corpus_n.shape[1])
    k = _candidate_k(m, n)
    while True:
        # faiss.knn is IndexFlatIP's exhaustive kernel without copying the corpus into an index.
        sims, ids = faiss.knn(seeds_n, corpus_n, k, metric=faiss.METRIC_INNER_PRODUCT)
        candidates = np.unique(ids)
        rows, scores = _select(candidates, _exact_scores(corpus_n[candidates], seeds_n), m)
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
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 12-13: the exact m corpus rows with the highest max-over-seeds cosine, via FAISS.

    Equal, bit for bit, to `brute_force_topm`; only faster on a large corpus.

    Args:
        corpus: [N, d] codes (numpy or torch). Zero rows score 0.
        seeds: [S, d] seed codes. A zero seed is an error.
        m: rows to select; fewer come back when fewer than m rows are not excluded.
        exclude: optional bool [N]; True rows are never selected (seed copies, duplicates).
        threads: FAISS threads for this call (restored afterwards); None: all CPUs available.

    Returns:
        (idx [m'] int64 corpus rows, score [m'] float64), by score desc then row asc;
        m' = min(m, N - excluded).
    """
    _check_m(m)
    _check_threads(threads)
    x = _as_float32_matrix(corpus, "corpus")
    seeds_n = _normalised_seeds(seeds, x.shape[1])
    mask = _exclude_mask(exclude, x.shape[0])
    kept = np.flatnonzero(~mask)
    corpus_n = _l2_normalise(x, "corpus", rows=kept if mask.any() else None, ignore=mask)
    n = corpus_n.shape[0]
    if n == 0:
        return _empty()
    if n <= m:
        rows, scores = _select(np.arange(n), _exact_scores(corpus_n, seeds_n), n)
        return kept[rows], scores
    with _faiss_threads(threads):
        rows, scores = _flat_topm(corpus_n, seeds_n, m)
    return kept[rows], scores


def brute_force_topm(
    corpus: Matrix, seeds: Matrix, m: int, *, exclude: np.ndarray | torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reference for `topm_max_over_seeds`: the full [N, S] cosine matrix with numpy.

    The float32 BLAS matrix picks every row within the rounding tolerance of the m-th best score;
    those rows are rescored canonically, so ties and near-ties resolve exactly as in the FAISS path.

    Args:
        corpus: [N, d] codes (numpy or torch).
        seeds: [S, d] seed codes.
        m: rows to select.
        exclude: optional bool [N]; True rows are never selected.

    Returns:
        (idx [m'] int64, score [m'] float64), by score desc then row asc; m' = min(m, N - excluded).
    """
    _check_m(m)
    x = _as_float32_matrix(corpus, "corpus")
    seeds_n = _normalised_seeds(seeds, x.shape[1])
    mask = _exclude_mask(exclude, x.shape[0])
    corpus_n = _l2_normalise(x, "corpus", ignore=mask)
    approx = (corpus_n @ seeds_n.T).max(axis=1)
    approx[mask] = -np.inf
    keep = int((~mask).sum())
    if keep == 0:
        return _empty()
    mm = min(m, keep)
    threshold = np.partition(approx, approx.size - mm)[approx.size - mm]
    candidates = np.flatnonzero(approx >= threshold - 2 * _score_tolerance(x.shape[1]))
    return _select(candidates, _exact_scores(corpus_n[candidates], seeds_n), mm)


# ---------------------------------------------------------------------------------------------
# the vote across layers


def _check_selection(sel: LayerSelection) -> None:
    rows, scores = np.asarray(sel.rows), np.asarray(sel.scores)
    if rows.ndim != 1 or rows.shape != scores.shape:
        raise RetrievalInputError(
            f"layer {sel.layer}: rows and scores must be 1-D of equal length, got {rows.shape} and {scores.shape}"
        )
    if not np.isfinite(scores).all():
        raise RetrievalInputError(f"layer {sel.layer}: scores must be finite (NaN/inf cannot be ordered)")
    if np.unique(rows).size != rows.size:
        raise RetrievalInputError(f"layer {sel.layer}: a row is selected more than once")


def _checked_weights(layers: list[int], weights: dict[int, float] | None) -> dict[int, float]:
    if weights is None:
        return dict.fromkeys(layers, 1.0)
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise RetrievalInputError(
            f"weights has no entry for layer(s) {missing}; give one weight per voting layer"
        )
    bad = {
        layer: weights[layer] for layer in layers if not (np.isfinite(weights[layer]) and weights[layer] >= 0)
    }
    if bad:
        raise RetrievalInputError(f"weights must be finite and >= 0, got {bad}")
    return {layer: float(weights[layer]) for layer in layers}


def vote(
    selections: list[LayerSelection], final_size: int, *, weights: dict[int, float] | None = None
) -> list[VotedRecord]:
    """Aggregate per-layer selections: order rows by (votes desc, mean score desc, row asc).

    Args:
        selections: one `LayerSelection` per layer (each layer at most once).
        final_size: records to return. Fewer come back when the union of the layers' rows is
            smaller than `final_size` (the vote never invents rows).
        weights: optional layer -> weight >= 0 (e.g. from `layer_weights`); a row's votes are then
            the sum of the weights of the layers that selected it instead of their count.

    Returns:
        Up to `final_size` `VotedRecord`s, best first.
    """
    if final_size < 1:
        raise RetrievalInputError(f"final_size must be >= 1, got {final_size}")
    layers = [s.layer for s in selections]
    if len(set(layers)) != len(layers):
        raise RetrievalInputError(f"each layer may vote once; got layers {layers}")
    w = _checked_weights(layers, weights)
    hits: dict[int, list[tuple[int, float]]] = {}
    for sel in sorted(selections, key=lambda s: s.layer):
        _check_selection(sel)
        for row, score in zip(np.asarray(sel.rows).tolist(), np.asarray(sel.scores).tolist(), strict=True):
            hits.setdefault(int(row), []).append((sel.layer, float(score)))
    records = [
        VotedRecord(
            row=row,
            votes=float(sum(w[layer] for layer, _ in picks)),  # summed in layer order: deterministic
            mean_score=float(np.mean([score for _, score in picks])),
            layers=[layer for layer, _ in picks],
        )
        for row, picks in hits.items()
    ]
    records.sort(key=lambda r: (-r.votes, -r.mean_score, r.row))
    return records[:final_size]


# ---------------------------------------------------------------------------------------------
# layer quality without labels


def _held_out_zscores(seeds_n: np.ndarray, sample_n: np.ndarray) -> np.ndarray:
    """Per seed i: how many corpus standard deviations seed i scores above the corpus sample
    under the max-over-seeds rule built from the other seeds.

    Args:
        seeds_n: [S, d] normalised seeds, S >= 2.
        sample_n: [n, d] normalised corpus sample.

    Returns:
        [S] float64 z-scores.
    """
    seeds64 = seeds_n.astype(np.float64)
    seed_sims = seeds64 @ seeds64.T
    corpus_sims = sample_n.astype(np.float64) @ seeds64.T
    z = np.empty(seeds_n.shape[0])
    for i in range(seeds_n.shape[0]):
        others = np.delete(np.arange(seeds_n.shape[0]), i)
        held_out = seed_sims[i, others].max()
        background = corpus_sims[:, others].max(axis=1)
        # A constant background (e.g. every sampled code all-zero) would divide by zero.
        z[i] = (held_out - background.mean()) / max(float(background.std()), 1e-6)
    return z


def layer_quality(
    seed_codes: dict[int, Matrix], corpus_codes: dict[int, Matrix], *, sample_size: int = 8192, seed: int = 0
) -> dict[int, float]:
    """Unsupervised quality of each layer's code space for seed-based retrieval (leave-one-seed-out).

    For each seed i, build the retrieval rule of eq. 12 from the other seeds and ask how far seed i
    stands out from the corpus under it: z_i = (s_{-i}(seed_i) - mean_x s_{-i}(x)) / std_x s_{-i}(x)
    over a fixed random corpus sample. The layer's quality is the mean z_i. It is high when an
    unseen in-domain example would rank near the top of the corpus in that layer, i.e. when the
    seeds form a cluster the corpus does not share; it is ~0 or negative when seeds look like any
    corpus row. Using the max rule itself (not the mean seed-seed cosine) keeps a domain made of
    several sub-topics from being penalised, and dividing by the corpus spread makes layers whose
    cosines live on different scales (dense vs sparse codes) comparable.

    Args:
        seed_codes: layer -> [S, d_l] seed codes, S >= 2 (the same seeds in every layer).
        corpus_codes: layer -> [N, d_l] corpus codes.
        sample_size: corpus rows sampled (without replacement, the same rows in every layer).
        seed: RNG seed of the sample.

    Returns:
        layer -> mean held-out z-score.
    """
    if set(seed_codes) != set(corpus_codes):
        raise RetrievalInputError(
            f"seed_codes has layers {sorted(seed_codes)} but corpus_codes has {sorted(corpus_codes)}; "
            "give both for the same layers"
        )
    if sample_size < 2:
        raise RetrievalInputError(f"sample_size must be >= 2, got {sample_size}")
    quality: dict[int, float] = {}
    for layer in sorted(seed_codes):
        codes = corpus_codes[layer]
        n = codes.shape[0]
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample_size), replace=False))
        # Sample before converting: a float64 or torch corpus is never copied whole.
        sample = codes[torch.from_numpy(rows)] if isinstance(codes, torch.Tensor) else codes[rows]
        sample_n = _l2_normalise(
            _as_float32_matrix(sample, f"corpus_codes[{layer}]"), f"corpus_codes[{layer}]"
        )
        seeds_n = _normalised_seeds(seed_codes[layer], sample_n.shape[1], name=f"seed_codes[{layer}]")
        if seeds_n.shape[0] < 2:
            raise RetrievalInputError(f"seed_codes[{layer}] has one seed; leave-one-out needs at least 2")
        quality[layer] = float(_held_out_zscores(seeds_n, sample_n).mean())
    return quality


def layer_weights(
    seed_codes: dict[int, Matrix], corpus_codes: dict[int, Matrix], *, sample_size: int = 8192, seed: int = 0
) -> dict[int, float]:
    """Vote weights from `layer_quality`: max(quality, 0), scaled to mean 1 over the layers.

    A layer whose seeds do not stand out from the corpus gets weight 0. Scaling to mean 1 keeps
    votes on the scale of a plain layer count. When no layer has positive quality there is no
    evidence to prefer any, so every layer gets weight 1.

    Args: as `layer_quality`.

    Returns:
        layer -> weight >= 0.
    """
    quality = layer_quality(seed_codes, corpus_codes, sample_size=sample_size, seed=seed)
    clipped = {layer: max(q, 0.0) for layer, q in quality.items()}
    total = sum(clipped.values())
    if total <= 0:
        return dict.fromkeys(quality, 1.0)
    return {layer: c * len(clipped) / total for layer, c in clipped.items()}

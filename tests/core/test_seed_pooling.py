"""Seed pooling (`curate.seed_pooling`): the pooled score itself, its exact top-M (whole matrix and
streamed) against an independent float64 reference, and what it changes in a curation."""

from __future__ import annotations

import numpy as np
import pytest

from finescope_core.config import CurateConfig
from finescope_core.curate import curate_records, seed_pooling
from finescope_core.retrieval import (
    RetrievalInputError,
    SeedPooling,
    brute_force_topm,
    tie_priority,
    topm_max_over_seeds,
)
from finescope_core.retrieval.stream import DenseSource, stream_topm

POOLINGS = [
    SeedPooling("max"),
    SeedPooling("mean"),
    SeedPooling("softmax", 0.2),
    SeedPooling("softmax", 0.01),
]


def _reference(corpus: np.ndarray, seeds: np.ndarray, pooling: SeedPooling) -> np.ndarray:
    """Every row's pooled score in float64 from the textbook formulas (no shared code with the library)."""
    c = corpus.astype(np.float64)
    s = seeds.astype(np.float64)
    cn = c / np.where(
        np.linalg.norm(c, axis=1, keepdims=True) > 0, np.linalg.norm(c, axis=1, keepdims=True), 1
    )
    sims = cn @ (s / np.linalg.norm(s, axis=1, keepdims=True)).T
    if pooling.kind == "max":
        return sims.max(axis=1)
    if pooling.kind == "mean":
        return sims.mean(axis=1)
    t = pooling.temperature
    top = sims.max(axis=1, keepdims=True)
    return (top + t * np.log(np.exp((sims - top) / t).mean(axis=1, keepdims=True)))[:, 0]


def _corpus(n: int = 700, d: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    corpus = np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32)
    corpus[100:110] = corpus[7]  # exact ties
    corpus[200:210] = 3 * corpus[8]  # ties up to rounding (same direction, another length)
    corpus[300:320] = 0  # zero rows score 0
    seeds = np.maximum(rng.normal(size=(6, d)), 0).astype(np.float32)
    return corpus, seeds


def test_pooled_scores_match_the_formulas_and_sit_between_mean_and_max() -> None:
    rng = np.random.default_rng(1)
    sims = rng.uniform(-1, 1, size=(50, 7))
    top, mean = sims.max(axis=1), sims.mean(axis=1)
    np.testing.assert_array_equal(SeedPooling("max")(sims), top)
    np.testing.assert_allclose(SeedPooling("mean")(sims), mean, rtol=0, atol=1e-15)
    for t in (0.01, 0.2, 5.0):
        soft = SeedPooling("softmax", t)(sims)
        np.testing.assert_allclose(soft, t * np.log(np.exp(sims / t).mean(axis=1)), rtol=0, atol=1e-12)
        assert np.all(soft <= top + 1e-12) and np.all(soft >= top - t * np.log(7) - 1e-12)
        assert np.all(soft >= mean - 1e-12)  # log-mean-exp is at least the mean (Jensen)
    # The two limits: a tiny temperature is the maximum, a huge one the mean.
    np.testing.assert_allclose(SeedPooling("softmax", 1e-4)(sims), top, atol=1e-3 * np.log(7))
    np.testing.assert_allclose(SeedPooling("softmax", 1e4)(sims), mean, atol=1e-4)


def test_pooling_is_one_lipschitz_so_the_rounding_bound_certifies_it() -> None:
    rng = np.random.default_rng(2)
    sims = rng.uniform(-1, 1, size=(200, 5))
    eps = 1e-6
    noise = rng.uniform(-eps, eps, size=sims.shape)
    for pooling in POOLINGS:
        assert np.abs(pooling(sims + noise) - pooling(sims)).max() <= eps * (1 + 1e-9)


def test_a_row_score_does_not_depend_on_the_other_rows() -> None:
    sims = np.random.default_rng(3).uniform(-1, 1, size=(300, 9))
    for pooling in POOLINGS:
        whole = pooling(sims)
        for lo, hi in ((0, 1), (5, 12), (17, 300)):
            np.testing.assert_array_equal(pooling(sims[lo:hi]), whole[lo:hi])


@pytest.mark.parametrize("pooling", POOLINGS, ids=lambda p: f"{p.kind}-{p.temperature}")
@pytest.mark.parametrize("m", [1, 30, 250])
def test_pooled_top_m_is_the_reference_top_m(pooling: SeedPooling, m: int) -> None:
    corpus, seeds = _corpus()
    n = corpus.shape[0]
    exclude = np.zeros(n, dtype=bool)
    exclude[[3, 7, 650]] = True
    priority = tie_priority([f"r{i}" for i in range(n)], seed=5)
    rows, scores = topm_max_over_seeds(corpus, seeds, m, exclude=exclude, priority=priority, pooling=pooling)
    brute_rows, brute_scores = brute_force_topm(
        corpus, seeds, m, exclude=exclude, priority=priority, pooling=pooling
    )
    np.testing.assert_array_equal(rows, brute_rows)
    np.testing.assert_array_equal(scores, brute_scores)
    ref = _reference(corpus, seeds, pooling)
    np.testing.assert_allclose(scores, ref[rows], rtol=0, atol=1e-6)
    # The set is the reference's top m: nothing outside it scores clearly higher than its last.
    outside = np.setdiff1d(np.flatnonzero(~exclude), rows)
    assert ref[outside].max() <= ref[rows].min() + 1e-6
    assert not set(rows.tolist()) & {3, 7, 650}
    # Ties go by priority: the copies of row 7 (excluded itself) come out in priority order.
    copies = [r for r in rows.tolist() if 100 <= r < 110]
    assert copies == sorted(copies, key=lambda r: int(priority[r]))


@pytest.mark.parametrize("pooling", POOLINGS[1:3], ids=lambda p: p.kind)
@pytest.mark.parametrize("block_rows", [None, 1, 7, 128])
def test_streamed_pooled_top_m_is_the_whole_matrix_bit_for_bit(
    pooling: SeedPooling, block_rows: int | None
) -> None:
    corpus, seeds = _corpus()
    n = corpus.shape[0]
    emb = {2: corpus, 6: np.sqrt(corpus)}
    seed_emb = {2: seeds, 6: np.sqrt(seeds)}
    priority = tie_priority([f"r{i}" for i in range(n)], seed=1)
    result = stream_topm(DenseSource(emb, block_rows), seed_emb, 40, priority=priority, pooling=pooling)
    for sel in result.selections:
        rows, scores = topm_max_over_seeds(
            emb[sel.layer], seed_emb[sel.layer], 40, priority=priority, pooling=pooling
        )
        np.testing.assert_array_equal(sel.rows, rows[scores > 0])
        np.testing.assert_array_equal(sel.scores, scores[scores > 0])
    expected = np.mean([_reference(emb[layer], seed_emb[layer], pooling) for layer in (2, 6)], axis=0)
    np.testing.assert_allclose(result.mean_scores, expected, atol=1e-5)


def test_bad_pooling_is_named() -> None:
    with pytest.raises(RetrievalInputError, match="unknown seed pooling 'median'"):
        SeedPooling("median")  # type: ignore[arg-type]
    with pytest.raises(RetrievalInputError, match="temperature must be > 0"):
        SeedPooling("softmax", 0.0)
    with pytest.raises(ValueError, match="seed_temperature"):
        CurateConfig(seed_temperature=0)


def _two_subtopics() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """A domain of two sub-topics (rows 0..39 near centre A, 40..79 near centre B) in 600 background
    rows, with 8 seeds near A and 2 near B; plus 60 background rows (100..159) that are each a near
    copy of one random 'stray' seed that sits in the background (as a mislabelled seed would)."""
    rng = np.random.default_rng(7)
    d = 48
    corpus = rng.normal(size=(600, d)).astype(np.float32)
    a, b = 3 * rng.normal(size=d), 3 * rng.normal(size=d)
    corpus[:40] = a + rng.normal(size=(40, d))
    corpus[40:80] = b + rng.normal(size=(40, d))
    seeds = np.concatenate(
        [a + rng.normal(size=(8, d)), b + rng.normal(size=(2, d)), rng.normal(size=(1, d))]
    ).astype(np.float32)
    corpus[100:160] = seeds[10] + 0.05 * rng.normal(size=(60, d))
    return {0: corpus}, {0: seeds}


def test_softmax_keeps_a_small_subtopic_that_the_mean_drops_and_the_stray_seed_that_max_follows() -> None:
    corpus, seeds = _two_subtopics()

    def picked(kind: str) -> set[int]:
        cfg = CurateConfig(final_size=80, top_m=80, seed_pooling=kind)  # type: ignore[arg-type]
        return {v.row for v in curate_records("sae", corpus, seeds, 600, cfg, 0).voted}

    domain = set(range(80))
    by_max, by_mean, by_soft = picked("max"), picked("mean"), picked("softmax")
    # max: the stray seed's 60 near copies outscore most of the domain.
    assert len(by_max & set(range(100, 160))) == 60
    # mean: no stray copies, but sub-topic B (2 of 10 seeds) loses a third of its rows to background.
    assert not by_mean & set(range(100, 160)) and len(by_mean & set(range(40, 80))) <= 30
    # softmax: both sub-topics (measured: 40 + 39) and at most a few stray copies (measured: 1).
    assert len(by_soft & domain) >= 76 and len(by_soft & set(range(100, 160))) <= 3
    assert seed_pooling(CurateConfig()) == SeedPooling("softmax", 0.2)

"""Tests for finescope_core.retrieval: exact top-M by max-over-seeds cosine, vote, layer weights."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from finescope_core.retrieval import (
    LayerSelection,
    RetrievalInputError,
    agreement_weights,
    brute_force_topm,
    layer_agreement,
    layer_quality,
    layer_weights,
    reciprocal_rank_fusion,
    tie_priority,
    topm_max_over_seeds,
    vote,
)
from finescope_core.retrieval.scores import exact_scores, l2_normalise, normalised_seeds


def naive_topm(corpus: np.ndarray, seeds: np.ndarray, m: int, exclude: np.ndarray | None = None):
    """Independent reference: float64 cosine of every row with every seed, sort by (-score, row)."""
    x = corpus.astype(np.float64)
    s = seeds.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    scores = (x[:, None, :] * s[None, :, :]).sum(-1).max(1)
    rows = np.arange(len(x)) if exclude is None else np.flatnonzero(~exclude)
    order = np.lexsort((rows, -scores[rows]))[:m]
    return rows[order], scores[rows][order]


def assert_same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    """Bit-identical indices and scores."""
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def clustered(n: int, d: int, clusters: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    return centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32), labels


@pytest.mark.parametrize("num_seeds", [1, 7, 40])
def test_flat_equals_brute_force_and_naive(num_seeds: int) -> None:
    rng = np.random.default_rng(num_seeds)
    corpus = rng.standard_normal((3000, 24)).astype(np.float32)
    seeds = rng.standard_normal((num_seeds, 24)).astype(np.float32)
    fast = topm_max_over_seeds(corpus, seeds, 50)
    assert_same(fast, brute_force_topm(corpus, seeds, 50))
    ref_rows, ref_scores = naive_topm(corpus, seeds, 50)
    np.testing.assert_array_equal(fast[0], ref_rows)
    np.testing.assert_allclose(fast[1], ref_scores, atol=1e-6)
    assert fast[0].dtype == np.int64 and np.all(np.diff(fast[1]) <= 0)


def test_exclusion_mask_is_respected_and_exact() -> None:
    corpus, _ = clustered(4000, 16, 20, seed=1)
    seeds = corpus[:6] + 0.01
    unmasked = topm_max_over_seeds(corpus, seeds, 60)[0]
    exclude = np.zeros(len(corpus), dtype=bool)
    exclude[unmasked[::2]] = True  # half of the unmasked winners must now give way
    exclude[np.random.default_rng(0).choice(len(corpus), 1000, replace=False)] = True
    fast = topm_max_over_seeds(corpus, seeds, 60, exclude=exclude)
    assert not exclude[fast[0]].any() and len(fast[0]) == 60
    assert_same(fast, brute_force_topm(corpus, seeds, 60, exclude=exclude))
    np.testing.assert_array_equal(fast[0], naive_topm(corpus, seeds, 60, exclude)[0])


def test_duplicate_rows_tie_break_by_lower_row() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((150, 12)).astype(np.float32)
    corpus = base[rng.integers(0, 150, size=2400)]  # every distinct row appears ~16 times
    # Seeds off the corpus rows: a seed's own copies would all score ~1, near-ties across seeds
    # that a float64 reference orders differently from float32-normalised codes.
    seeds = base[:5] + 0.1 * rng.standard_normal((5, 12)).astype(np.float32)
    for m in (7, 35, 90):  # boundaries falling inside tie groups
        fast = topm_max_over_seeds(corpus, seeds, m)
        assert_same(fast, brute_force_topm(corpus, seeds, m))
        assert_same(fast, _canonical_reference(corpus, seeds, m))
        ref_rows, _ = naive_topm(corpus, seeds, m)
        np.testing.assert_array_equal(fast[0], ref_rows)


def _canonical_reference(corpus: np.ndarray, seeds: np.ndarray, m: int):
    """Full canonical scoring of every row, for bit-exact comparisons on tie-heavy data."""
    corpus_n = l2_normalise(np.ascontiguousarray(corpus, np.float32), "corpus")
    seeds_n = normalised_seeds(seeds, corpus.shape[1])
    scores = exact_scores(corpus_n, seeds_n)
    order = np.lexsort((np.arange(len(scores)), -scores))[:m]
    return order.astype(np.int64), scores[order]


def test_near_ties_from_scaled_copies_are_certified() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((100, 20)).astype(np.float32)
    factors = rng.uniform(0.1, 10.0, size=2000).astype(np.float32)
    corpus = base[rng.integers(0, 100, size=2000)] * factors[:, None]  # same direction, other rounding
    seeds = base[:4] + 0.1 * rng.standard_normal((4, 20)).astype(np.float32)
    for m in (5, 40):
        assert_same(topm_max_over_seeds(corpus, seeds, m), _canonical_reference(corpus, seeds, m))
        assert_same(brute_force_topm(corpus, seeds, m), _canonical_reference(corpus, seeds, m))


def test_widening_survives_adversarial_tie_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAISS promises nothing about ties: with a kernel that keeps the highest ids the answer must
    not move."""
    real_knn = faiss.knn
    calls: list[int] = []

    def knn_preferring_high_ids(xq, xb, k, metric):
        calls.append(k)
        sims = xq @ xb.T
        ids = np.stack([np.lexsort((-np.arange(xb.shape[0]), -row))[:k] for row in sims])
        return np.take_along_axis(sims, ids, axis=1), ids

    rng = np.random.default_rng(4)
    corpus = rng.standard_normal((500, 8)).astype(np.float32)
    seeds = rng.standard_normal((2, 8)).astype(np.float32)
    corpus[100:400] = seeds[0] * 2.0  # 300 rows tied at the top, more than the first k
    monkeypatch.setattr(faiss, "knn", knn_preferring_high_ids)
    fast = topm_max_over_seeds(corpus, seeds, 10)
    monkeypatch.setattr(faiss, "knn", real_knn)
    assert len(calls) > 1 and calls[-1] > calls[0]
    np.testing.assert_array_equal(fast[0], np.arange(100, 110))
    assert_same(fast, brute_force_topm(corpus, seeds, 10))


def test_m_larger_than_corpus_returns_every_kept_row() -> None:
    rng = np.random.default_rng(5)
    corpus = rng.standard_normal((30, 6)).astype(np.float32)
    seeds = rng.standard_normal((3, 6)).astype(np.float32)
    exclude = np.zeros(30, dtype=bool)
    exclude[[0, 7]] = True
    rows, scores = topm_max_over_seeds(corpus, seeds, 100, exclude=exclude)
    assert sorted(rows.tolist()) == [i for i in range(30) if i not in (0, 7)]
    assert_same((rows, scores), brute_force_topm(corpus, seeds, 100, exclude=exclude))
    empty = topm_max_over_seeds(corpus, seeds, 5, exclude=np.ones(30, dtype=bool))
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_zero_corpus_rows_score_zero() -> None:
    rng = np.random.default_rng(6)
    seeds = np.abs(rng.standard_normal((3, 10))).astype(np.float32)
    corpus = -np.abs(rng.standard_normal((400, 10))).astype(np.float32)  # every cosine < 0
    zero_rows = [3, 50, 222]
    corpus[zero_rows] = 0.0
    for fn in (topm_max_over_seeds, brute_force_topm):
        rows, scores = fn(corpus, seeds, 5)
        assert rows[:3].tolist() == zero_rows and np.all(scores[:3] == 0.0)
        assert np.isfinite(scores).all() and np.all(scores[3:] < 0)


def test_torch_input_matches_numpy_and_threads_are_restored() -> None:
    rng = np.random.default_rng(7)
    corpus = rng.standard_normal((800, 16)).astype(np.float32)
    seeds = rng.standard_normal((4, 16)).astype(np.float32)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        out = topm_max_over_seeds(torch.from_numpy(corpus).double(), torch.from_numpy(seeds), 20, threads=2)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(previous)
    assert_same(out, topm_max_over_seeds(corpus, seeds, 20))


def test_bad_inputs_name_the_problem() -> None:
    corpus = np.ones((10, 4), dtype=np.float32)
    seeds = np.ones((3, 4), dtype=np.float32)
    seeds[1] = 0.0
    with pytest.raises(RetrievalInputError, match=r"seeds row\(s\) \[1\]"):
        topm_max_over_seeds(corpus, seeds, 2)
    with pytest.raises(RetrievalInputError, match="dimension 3"):
        brute_force_topm(corpus, np.ones((2, 3)), 2)
    with pytest.raises(RetrievalInputError, match="exclude must be a boolean mask"):
        topm_max_over_seeds(corpus, np.ones((1, 4)), 2, exclude=np.zeros(9, dtype=bool))
    bad = corpus.copy()
    bad[4, 2] = np.nan
    with pytest.raises(RetrievalInputError, match="corpus row 4"):
        topm_max_over_seeds(bad, np.ones((1, 4)), 2)
    skip_bad = np.zeros(10, dtype=bool)
    skip_bad[4] = True  # an excluded row is never read, so its values do not matter
    assert 4 not in topm_max_over_seeds(bad, np.ones((1, 4)), 20, exclude=skip_bad)[0]
    assert_same(
        brute_force_topm(bad, np.ones((1, 4)), 20, exclude=skip_bad),
        topm_max_over_seeds(bad, np.ones((1, 4)), 20, exclude=skip_bad),
    )
    with pytest.raises(RetrievalInputError, match="m must be a positive integer"):
        topm_max_over_seeds(corpus, np.ones((1, 4)), 0)
    with pytest.raises(RetrievalInputError, match="threads must be >= 1"):
        topm_max_over_seeds(corpus, np.ones((1, 4)), 2, threads=0)


def _hand_selections() -> list[LayerSelection]:
    return [
        LayerSelection(0, np.array([5, 3, 7]), np.array([0.9, 0.8, 0.7])),
        LayerSelection(1, np.array([3, 5, 8]), np.array([0.95, 0.6, 0.5])),
        LayerSelection(2, np.array([9, 11, 3]), np.array([0.99, 0.7, 0.4])),
    ]


def test_vote_orders_by_votes_then_mean_score_then_row() -> None:
    out = vote(_hand_selections(), final_size=10)
    assert [r.row for r in out] == [3, 5, 9, 7, 11, 8]  # 7 and 11 tie on (1 vote, 0.7): lower row first
    assert [r.votes for r in out] == [3.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    assert out[0].layers == [0, 1, 2] and out[0].mean_score == pytest.approx((0.8 + 0.95 + 0.4) / 3)
    assert out[1].layers == [0, 1] and out[1].mean_score == pytest.approx(0.75)
    assert [r.row for r in vote(_hand_selections(), final_size=4)] == [3, 5, 9, 7]


def test_vote_drops_zero_scores_and_breaks_ties_by_priority() -> None:
    sel = [
        LayerSelection(0, np.array([4, 2, 6, 1]), np.array([0.5, 0.5, 0.0, 0.0])),
        LayerSelection(1, np.array([2, 4, 1, 6]), np.array([0.5, 0.5, 0.0, -0.1])),
    ]
    assert [r.row for r in vote(sel, 10)] == [
        2,
        4,
    ]  # zero and negative picks are no votes; row order breaks the tie
    priority = np.zeros(7, dtype=np.uint64)
    priority[[2, 4]] = [9, 3]
    out = vote(sel, 10, priority=priority)
    assert [r.row for r in out] == [4, 2] and [r.votes for r in out] == [2.0, 2.0]
    assert vote([LayerSelection(0, np.array([0, 1]), np.zeros(2))], 5) == []  # all-zero codes: nothing chosen
    with pytest.raises(RetrievalInputError, match="priority has 3 entries"):
        vote(sel, 10, priority=np.zeros(3, dtype=np.uint64))


def test_tie_priority_follows_the_id_and_the_seed() -> None:
    ids = [f"r{i}" for i in range(200)]
    p = tie_priority(ids, seed=0)
    assert p.dtype == np.uint64 and len(set(p.tolist())) == 200
    perm = np.random.default_rng(1).permutation(200)
    np.testing.assert_array_equal(tie_priority([ids[i] for i in perm], seed=0), p[perm])
    assert not np.array_equal(tie_priority(ids, seed=1), p)
    assert np.argsort(p)[:20].tolist() != list(range(20))  # not row order


def test_search_breaks_score_ties_by_priority() -> None:
    """300 tied rows at the top, more than m: the winners are those of lowest priority, in both paths."""
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((500, 8)).astype(np.float32)
    seed = rng.standard_normal((1, 8)).astype(np.float32)
    corpus[100:400] = seed[0] * 2.0
    priority = tie_priority([f"id{i}" for i in range(500)], seed=5)
    exclude = np.zeros(500, dtype=bool)
    exclude[[101, 250]] = True
    for ex in (None, exclude):
        rows, _ = topm_max_over_seeds(corpus, seed, 40, exclude=ex, priority=priority)
        tied = np.arange(100, 400) if ex is None else np.setdiff1d(np.arange(100, 400), [101, 250])
        assert rows.tolist() == tied[np.argsort(priority[tied], kind="stable")][:40].tolist()
        assert_same((rows, _), brute_force_topm(corpus, seed, 40, exclude=ex, priority=priority))
    with pytest.raises(RetrievalInputError, match="priority must be an integer array"):
        topm_max_over_seeds(corpus, seed, 4, priority=np.zeros(3, dtype=np.int64))


def test_vote_with_weights() -> None:
    out = vote(_hand_selections(), final_size=10, weights={0: 1.0, 1: 0.0, 2: 3.0})
    assert [(r.row, r.votes) for r in out] == [(3, 4.0), (9, 3.0), (11, 3.0), (5, 1.0), (7, 1.0), (8, 0.0)]
    assert out[3].mean_score == pytest.approx(0.75)  # the unweighted mean over both layers that chose row 5


def test_vote_rejects_bad_input() -> None:
    sel = _hand_selections()
    with pytest.raises(RetrievalInputError, match="no entry for layer"):
        vote(sel, 5, weights={0: 1.0, 1: 1.0})
    with pytest.raises(RetrievalInputError, match="finite and >= 0"):
        vote(sel, 5, weights={0: 1.0, 1: -1.0, 2: 1.0})
    with pytest.raises(RetrievalInputError, match="vote once"):
        vote([*sel, sel[0]], 5)
    with pytest.raises(RetrievalInputError, match="finite"):
        vote([LayerSelection(0, np.array([1, 2]), np.array([0.5, np.nan]))], 5)
    with pytest.raises(RetrievalInputError, match="more than once"):
        vote([LayerSelection(0, np.array([1, 1]), np.array([0.5, 0.4]))], 5)


def _two_layer_codes() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Layer 4: seeds form a tight cluster the corpus lacks. Layer 9: seeds look like corpus rows."""
    rng = np.random.default_rng(9)
    corpus = {layer: np.maximum(rng.standard_normal((5000, 64)), 0).astype(np.float32) for layer in (4, 9)}
    centre = np.maximum(rng.standard_normal(64), 0)
    seeds = {
        4: np.maximum(centre + 0.3 * rng.standard_normal((10, 64)), 0).astype(np.float32),
        9: np.maximum(rng.standard_normal((10, 64)), 0).astype(np.float32),
    }
    return seeds, corpus


def test_layer_weights_prefer_the_layer_where_seeds_cluster() -> None:
    seeds, corpus = _two_layer_codes()
    quality = layer_quality(seeds, corpus, sample_size=2000)
    assert quality[4] > 3.0 and abs(quality[9]) < 1.5
    weights = layer_weights(seeds, corpus, sample_size=2000)
    assert weights[4] > weights[9] >= 0.0
    assert np.mean(list(weights.values())) == pytest.approx(1.0)
    assert layer_quality(seeds, corpus, sample_size=2000) == quality  # fixed sample: deterministic


def test_layer_weights_uniform_without_evidence_and_checks_layers() -> None:
    rng = np.random.default_rng(10)
    corpus = {0: rng.standard_normal((300, 8)).astype(np.float32)}
    anti = {0: np.stack([np.ones(8), -np.ones(8)]).astype(np.float32)}  # held-out seed is the opposite
    assert layer_quality(anti, corpus)[0] < 0
    assert layer_weights(anti, corpus) == {0: 1.0}
    with pytest.raises(RetrievalInputError, match="same layers"):
        layer_weights({0: anti[0], 1: anti[0]}, corpus)
    with pytest.raises(RetrievalInputError, match="at least 2"):
        layer_quality({0: anti[0][:1]}, corpus)


def test_layer_quality_rewards_a_domain_with_two_subtopics() -> None:
    """Held-out seeds are scored by their nearest other seed (eq. 12's max), so two tight sub-topics
    count as a good layer even though half the seed pairs are far apart."""
    rng = np.random.default_rng(11)
    corpus = torch.from_numpy(np.maximum(rng.standard_normal((4000, 32)), 0).astype(np.float32))
    centres = np.maximum(rng.standard_normal((2, 32)), 0)
    seeds = np.maximum(np.repeat(centres, 5, axis=0) + 0.2 * rng.standard_normal((10, 32)), 0)
    quality = layer_quality({3: torch.from_numpy(seeds)}, {3: corpus}, sample_size=1000)
    assert quality[3] > 3.0


def test_agreement_weights_count_layers_by_overlap_beyond_chance() -> None:
    """Layers 0 and 1 share 8 of 10 rows; layer 2's list is disjoint from both: it gets weight 0."""
    sel = [
        LayerSelection(0, np.arange(10), np.ones(10)),
        LayerSelection(1, np.arange(2, 12), np.ones(10)),
        LayerSelection(2, np.arange(50, 60), np.ones(10)),
    ]
    a = layer_agreement(sel, 1000)
    assert a[0] == pytest.approx((0.8 - 0.01 + 0.0 - 0.01) / 2) and a[0] == pytest.approx(a[1])
    assert a[2] == pytest.approx(-0.01)
    w = agreement_weights(sel, 1000)
    assert w[2] == 0.0 and w[0] == pytest.approx(1.5) and sum(w.values()) == pytest.approx(3.0)
    # No evidence (a lone layer, or lists that overlap no more than chance): every layer counts 1.
    assert agreement_weights(sel[:1], 1000) == {0: 1.0}
    assert agreement_weights([sel[0], sel[2]], 1000) == {0: 1.0, 2: 1.0}
    with pytest.raises(RetrievalInputError, match="corpus_size"):
        layer_agreement(sel, 0)


def test_reciprocal_rank_fusion_by_hand() -> None:
    fused = reciprocal_rank_fusion([[5, 3, 7], [3, 9]], final_size=10, k=0)
    # 3: 1/2 + 1/1; 5: 1/1; 9: 1/2; 7: 1/3
    assert fused == [(3, 1.5, 2), (5, 1.0, 1), (9, 0.5, 1), (7, pytest.approx(1 / 3), 1)]
    assert [r for r, _, _ in reciprocal_rank_fusion([[1], [2]], 2)] == [1, 2]  # a tie: lower row
    priority = np.array([0, 9, 1], dtype=np.uint64)
    assert [r for r, _, _ in reciprocal_rank_fusion([[1], [2]], 2, priority=priority)] == [2, 1]
    assert len(reciprocal_rank_fusion([[5, 3, 7], [3, 9]], final_size=2)) == 2
    with pytest.raises(RetrievalInputError, match="more than once"):
        reciprocal_rank_fusion([[1, 1]], 2)

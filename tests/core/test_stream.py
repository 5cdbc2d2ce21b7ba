"""Streaming retrieval (`retrieval.stream`) against the whole-matrix search, and its memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from finescope_core.retrieval import RetrievalInputError, tie_priority, topm_max_over_seeds
from finescope_core.retrieval.stream import Block, DenseSource, materialise, stream_topm


def _corpus(n: int = 900, d: int = 24, seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    corpus = {layer: np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32) for layer in (3, 5)}
    for emb in corpus.values():
        emb[100:110] = emb[7]  # ties with row 7 in every block they fall into
        emb[400:420] = 0  # all-zero rows never score above 0
    seeds = {layer: np.maximum(rng.normal(size=(6, d)), 0).astype(np.float32) for layer in corpus}
    seeds[3][2] = 0  # a seed with a zero code does not vote in that layer
    return corpus, seeds


@pytest.mark.parametrize("block_rows", [None, 1, 7, 128, 450])
@pytest.mark.parametrize("m", [1, 25, 300])
def test_streamed_top_m_is_the_whole_matrix_top_m_bit_for_bit(block_rows: int | None, m: int) -> None:
    corpus, seeds = _corpus()
    n = 900
    exclude = np.zeros(n, dtype=bool)
    exclude[[7, 55, 830]] = True
    priority = tie_priority([f"id-{i}" for i in range(n)], seed=3)
    result = stream_topm(DenseSource(corpus, block_rows), seeds, m, exclude=exclude, priority=priority)
    for sel in result.selections:
        usable = seeds[sel.layer][np.linalg.norm(seeds[sel.layer], axis=1) > 0]
        rows, scores = topm_max_over_seeds(corpus[sel.layer], usable, m, exclude=exclude, priority=priority)
        positive = scores > 0
        np.testing.assert_array_equal(sel.rows, rows[positive])
        np.testing.assert_array_equal(sel.scores, scores[positive])
        assert not set(sel.rows.tolist()) & {7, 55, 830}


def test_mean_scores_and_the_sample_cover_every_row() -> None:
    corpus, seeds = _corpus()
    sample = np.array([0, 5, 449, 450, 899])
    whole = stream_topm(DenseSource(corpus), seeds, 10, sample_rows=sample)
    blocks = stream_topm(DenseSource(corpus, 100), seeds, 10, sample_rows=sample)
    np.testing.assert_allclose(blocks.mean_scores, whole.mean_scores, rtol=1e-6)
    assert whole.mean_scores[400:420].max() == 0  # zero rows
    assert blocks.sample is not None
    for layer, emb in blocks.sample.items():
        np.testing.assert_array_equal(emb, corpus[layer][sample])


def test_a_layer_whose_seeds_are_all_zero_does_not_vote() -> None:
    corpus, seeds = _corpus()
    seeds[5][:] = 0
    result = stream_topm(DenseSource(corpus, 300), seeds, 10)
    assert [s.layer for s in result.selections] == [3]


def test_bad_inputs_are_named() -> None:
    corpus, seeds = _corpus()
    with pytest.raises(RetrievalInputError, match="no seed embeddings for layers \\[5\\]"):
        stream_topm(DenseSource(corpus), {3: seeds[3]}, 10)
    with pytest.raises(RetrievalInputError, match="exclude must have one entry per corpus row"):
        stream_topm(DenseSource(corpus), seeds, 10, exclude=np.zeros(5, dtype=bool))
    with pytest.raises(RetrievalInputError, match="same rows"):
        DenseSource({1: np.zeros((3, 2)), 2: np.zeros((4, 2))})


class _Generated:
    """`blocks` blocks of `rows` random rows, made on the fly: a corpus never held in memory."""

    def __init__(self, blocks: int, rows: int, dim: int):
        self.count, self.rows, self.dim = blocks, rows, dim

    @property
    def layers(self) -> list[int]:
        return [0]

    @property
    def num_rows(self) -> int:
        return self.count * self.rows

    def blocks(self) -> Iterator[Block]:
        for b in range(self.count):
            rng = np.random.default_rng(b)
            yield Block(b * self.rows, {0: rng.random((self.rows, self.dim), dtype=np.float32)})

    def gather(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        return {0: materialise(self)[0][np.asarray(rows)]}


def _peak(source: _Generated, seeds: dict[int, np.ndarray]) -> int:
    tracemalloc.start()
    try:
        stream_topm(source, seeds, 100)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_shards() -> None:
    rows, dim = 2000, 256  # one block: 2 MB
    seeds = {0: np.random.default_rng(99).random((10, dim), dtype=np.float32)}
    few, many = _peak(_Generated(4, rows, dim), seeds), _peak(_Generated(16, rows, dim), seeds)
    block = rows * dim * 4
    # One score per row (4 bytes) is the only thing that grows: 16 x 2000 x 4 = 128 KB.
    assert many < few * 1.25 + 16 * rows * 4, f"peak {many} B over 16 shards vs {few} B over 4"
    # A few block-sized buffers (the block, its normalised copy, the search's), never the 32 MB corpus.
    assert many < 6 * block, f"peak {many} B, {many / block:.1f} blocks of {block} B"

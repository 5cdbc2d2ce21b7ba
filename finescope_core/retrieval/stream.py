"""Retrieval over a corpus that is read shard by shard: exact per-layer top-M with memory of one shard.

A corpus's embeddings come from an `EmbeddingSource`: it yields consecutive row blocks, each with one
dense [n, d] float32 matrix per layer (decoded from sparse SAE codes, z-scored activations, or slices
of an in-memory matrix). `stream_topm` runs the exact search of `search.topm_max_over_seeds` on every
block and merges the block lists. The merge is exact: a row of the global top-M (by score desc, then
priority, then row) is in the top-M of its own block under the same order, since the block's rows are
a subset of the corpus and scores are canonical (they depend on the row and the seeds alone), so the
global list is the top-M of the union of the block lists. Peak memory is one block plus the seeds, the
lists (M per layer per block, merged as they come) and one float per row for the score histogram.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from finescope_core.retrieval.scores import (
    MAX,
    RetrievalInputError,
    SeedPooling,
    as_float32_matrix,
    l2_normalise,
    normalised_seeds,
    select_top,
)
from finescope_core.retrieval.search import topm_max_over_seeds
from finescope_core.retrieval.vote import LayerSelection


@dataclass(frozen=True)
class Block:
    """Consecutive corpus rows [start, start + n) and their embeddings per layer ([n, d_layer] float32)."""

    start: int
    embeddings: Mapping[int, np.ndarray]

    @property
    def size(self) -> int:
        return int(next(iter(self.embeddings.values())).shape[0])


class EmbeddingSource(Protocol):
    """A corpus's embeddings per layer, readable block by block and row by row."""

    @property
    def layers(self) -> list[int]: ...

    @property
    def num_rows(self) -> int: ...

    def blocks(self) -> Iterator[Block]:
        """Consecutive blocks covering rows 0..num_rows-1 once, in order."""
        ...

    def gather(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        """layer -> [len(rows), d] embeddings of the given rows, in the given order."""
        ...


class DenseSource:
    """An in-memory {layer: [N, d]} matrix as a source, `block_rows` rows per block (None: one block).

    With one block, `stream_topm` is exactly `topm_max_over_seeds` on the whole matrix.
    """

    def __init__(self, embeddings: Mapping[int, np.ndarray], block_rows: int | None = None):
        if not embeddings:
            raise RetrievalInputError("no layers given; embeddings must map at least one layer to a matrix")
        sizes = {layer: e.shape[0] for layer, e in embeddings.items()}
        if len(set(sizes.values())) != 1:
            raise RetrievalInputError(
                f"every layer's matrix must have the same rows; got rows per layer {sizes}"
            )
        if block_rows is not None and block_rows < 1:
            raise RetrievalInputError(f"block_rows must be >= 1 (or None for one block), got {block_rows}")
        self._emb = dict(embeddings)
        self._rows = int(next(iter(sizes.values())))
        self._block = block_rows or max(1, self._rows)

    @property
    def layers(self) -> list[int]:
        return list(self._emb)

    @property
    def num_rows(self) -> int:
        return self._rows

    def blocks(self) -> Iterator[Block]:
        for start in range(0, self._rows, self._block):
            yield Block(start, {layer: e[start : start + self._block] for layer, e in self._emb.items()})

    def gather(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        idx = np.asarray(rows, dtype=np.int64)
        return {layer: np.asarray(e[idx]) for layer, e in self._emb.items()}


def gather_from_blocks(blocks: Iterator[Block], rows: Sequence[int]) -> dict[int, np.ndarray]:
    """layer -> [len(rows), d] embeddings of the given corpus rows (in that order), from one pass over
    `blocks`; a source's `gather` when it has no faster way to reach single rows."""
    want = np.asarray(rows, dtype=np.int64)
    out: dict[int, np.ndarray] = {}
    for block in blocks:
        hit = np.flatnonzero((want >= block.start) & (want < block.start + block.size))
        for layer, emb in block.embeddings.items():
            if layer not in out:
                out[layer] = np.zeros((len(want), emb.shape[1]), dtype=np.float32)
            out[layer][hit] = emb[want[hit] - block.start]
    return out


def materialise(source: EmbeddingSource) -> dict[int, np.ndarray]:
    """Every block of `source` as one {layer: [N, d]} matrix: the dense path, for tests and benchmarks
    only."""
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in source.layers}
    for block in source.blocks():
        for layer, emb in block.embeddings.items():
            parts[layer].append(as_float32_matrix(emb, f"layer {layer}"))
    return {layer: np.concatenate(p) for layer, p in parts.items()}


@dataclass
class StreamResult:
    """What one pass over the corpus gives: each layer's top-M and every row's mean score."""

    selections: list[LayerSelection]
    """Per voting layer (a layer whose seeds all have zero codes does not vote): its top-M rows with a
    positive score, best first."""
    mean_scores: np.ndarray
    """[N] float32: each row's max-over-seeds cosine (or pooled score) averaged over the voting layers
    (excluded rows included), for the score histogram of the report."""
    sample: dict[int, np.ndarray] | None = None
    """layer -> the embeddings of the sampled rows (`sample_rows` of `stream_topm`), in row order."""


def _merge(
    kept: tuple[np.ndarray, np.ndarray],
    new: tuple[np.ndarray, np.ndarray],
    m: int,
    priority: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    rows, scores = np.concatenate([kept[0], new[0]]), np.concatenate([kept[1], new[1]])
    return select_top(rows, scores, m, priority)


def stream_topm(
    source: EmbeddingSource,
    seeds: Mapping[int, np.ndarray],
    m: int,
    *,
    exclude: np.ndarray | None = None,
    priority: np.ndarray | None = None,
    sample_rows: np.ndarray | None = None,
    threads: int | None = None,
    pooling: SeedPooling = MAX,
) -> StreamResult:
    """Per layer, the exact m rows with the highest max-over-seeds cosine (eq. 12-13; or pooled score
    under another `pooling`), in one pass.

    Equal to `topm_max_over_seeds` on the whole matrix of each layer (rows, scores and order), with
    peak memory of one block.

    Args:
        source: the corpus embeddings.
        seeds: layer -> [S, d] seed embeddings. Seeds with an all-zero vector do not vote in that layer;
            a layer where every seed is zero is left out (see `StreamResult.selections`).
        m: rows to keep per layer.
        exclude: optional bool [N]; True rows are never selected.
        priority: optional [N] tie-break key per row (`scores.tie_priority`).
        sample_rows: optional sorted corpus rows whose embeddings are collected on the way (for
            `weights.layer_weights`, which needs a corpus sample).
        threads: FAISS threads (None: every CPU available).
        pooling: how a row's seed cosines become its score (`scores.SeedPooling`; default the maximum).

    Raises:
        RetrievalInputError: seeds for a layer the source lacks; masks or priorities of the wrong shape.
    """
    n = source.num_rows
    missing = sorted(set(source.layers) - set(seeds))
    if missing:
        raise RetrievalInputError(
            f"no seed embeddings for layers {missing}; give seeds for every layer of the corpus"
        )
    for name, arr in (("exclude", exclude), ("priority", priority)):
        if arr is not None and np.asarray(arr).shape != (n,):
            raise RetrievalInputError(
                f"{name} must have one entry per corpus row ({n}), got shape {np.asarray(arr).shape}"
            )
    usable = {layer: s[np.linalg.norm(s, axis=1) > 0] for layer, s in seeds.items() if layer in source.layers}
    voting = [layer for layer in source.layers if len(usable[layer])]
    seeds_n = {
        layer: normalised_seeds(usable[layer], usable[layer].shape[1], name=f"seeds[{layer}]")
        for layer in voting
    }
    kept = {layer: (np.empty(0, np.int64), np.empty(0, np.float64)) for layer in voting}
    mean_scores = np.zeros(n, dtype=np.float32)
    sample = None if sample_rows is None else np.asarray(sample_rows, dtype=np.int64)
    sampled: dict[int, list[np.ndarray]] = {layer: [] for layer in voting}
    # The raw seeds go to the search, which normalises them itself: scores match the dense path bit for bit.
    covered = 0
    for block in source.blocks():
        if block.start != covered:
            raise RetrievalInputError(
                f"the corpus source yielded a block at row {block.start}, expected {covered}"
            )
        size = block.size
        stop = block.start + size
        local_ex = None if exclude is None else np.asarray(exclude[block.start : stop], dtype=bool)
        local_pr = None if priority is None else np.asarray(priority[block.start : stop])
        for layer in voting:
            emb = as_float32_matrix(block.embeddings[layer], f"layer {layer} rows {block.start}:{stop}")
            rows, scores = topm_max_over_seeds(
                emb, usable[layer], m, exclude=local_ex, priority=local_pr, threads=threads, pooling=pooling
            )
            kept[layer] = _merge(kept[layer], (rows + block.start, scores), m, priority)
            # The histogram's scores: float32 BLAS is plenty for a plot.
            mean_scores[block.start : stop] += pooling(l2_normalise(emb, "corpus") @ seeds_n[layer].T) / len(
                voting
            )
            if sample is not None:
                inside = sample[(sample >= block.start) & (sample < stop)]
                sampled[layer].append(emb[inside - block.start])
        covered = stop
    if covered != n:
        raise RetrievalInputError(f"the corpus source covered {covered} of its {n} rows")
    selections = []
    for layer in voting:
        rows, scores = kept[layer]
        positive = scores > 0
        selections.append(LayerSelection(layer=layer, rows=rows[positive], scores=scores[positive]))
    gathered = (
        None
        if sample is None
        else {layer: np.concatenate(p) if p else np.empty((0, 0), np.float32) for layer, p in sampled.items()}
    )
    return StreamResult(selections=selections, mean_scores=mean_scores, sample=gathered)

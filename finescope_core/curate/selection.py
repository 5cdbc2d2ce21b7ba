"""Retrieval and the vote: per-layer top-M over the corpus embeddings, layer weights, the vote across
layers, seed expansion and fusion with the sentence ranking; never an excluded row."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finescope_core import retrieval
from finescope_core.config import CurateConfig
from finescope_core.curate.embeddings import Embeddings
from finescope_core.curate.layers import CurationError, sample_rows
from finescope_core.retrieval.stream import DenseSource, EmbeddingSource, StreamResult, stream_topm

log = logging.getLogger(__name__)


def _as_source(emb: Embeddings) -> EmbeddingSource:
    return DenseSource(emb) if isinstance(emb, Mapping) else emb


@dataclass
class Curation:
    """What the retrieval and vote give: the voted records, the summary, every row's score."""

    voted: list[retrieval.VotedRecord]
    summary: dict[str, Any]
    mean_scores: np.ndarray | None = None
    """[N] each corpus row's max-over-seeds cosine, averaged over the voting layers (None for `random`)."""


def select_records(
    method: str,
    corpus_emb: Embeddings | None,
    seed_emb: dict[int, np.ndarray] | None,
    corpus_size: int,
    cfg: CurateConfig,
    seed: int,
    exclude_rows: Sequence[int] = (),
    ids: Sequence[str] | None = None,
    fusion_emb: tuple[Embeddings, dict[int, np.ndarray]] | None = None,
) -> tuple[list[retrieval.VotedRecord], dict[str, Any]]:
    """`curate_records` without the per-row scores: (voted records, summary)."""
    result = curate_records(
        method, corpus_emb, seed_emb, corpus_size, cfg, seed, exclude_rows, ids, fusion_emb
    )
    return result.voted, result.summary


def curate_records(
    method: str,
    corpus_emb: Embeddings | None,
    seed_emb: dict[int, np.ndarray] | None,
    corpus_size: int,
    cfg: CurateConfig,
    seed: int,
    exclude_rows: Sequence[int] = (),
    ids: Sequence[str] | None = None,
    fusion_emb: tuple[Embeddings, dict[int, np.ndarray]] | None = None,
) -> Curation:
    """Per-layer top-M then the vote across layers (or a seeded sample for `random`); never an excluded row.

    The corpus embeddings may be a source read block by block (`retrieval.stream`): each round is one
    pass over it with the memory of one block, and gives the same records as the whole matrix.

    Rows scoring 0 or less in every layer are never selected, so fewer than `cfg.final_size` records
    can come back. Ties (in votes and mean score) are broken by a hash of each record's id seeded
    with `seed` (`ids`, one per corpus row; None: by the lower row), so with ids the curated set
    does not depend on the order of the corpus.

    With `cfg.expand_seeds` > 0 the best records of a first round join the seeds (their codes, in
    every layer) for a second round. With `fusion_emb` (the sentence baseline's (corpus, seeds)
    embeddings, for `cfg.fusion: sentence`) the method's ranking and the sentence ranking, each
    2 x `final_size` deep, are fused by reciprocal rank; each record's `mean_score` is then its fused
    score, `votes` its votes in the method's ranking (0 when only the sentence ranking holds it),
    and `layers` gains -1 when the sentence ranking holds it.

    Returns:
        The voted records, best first; what the summary records about the vote: per layer the mean
        top-M score (and, with a `cfg.layer_weighting` other than "vote", the layer's vote weight), the
        M actually used, and how many seed copies were excluded; every row's mean score (last round).
    """
    excluded = set(exclude_rows)
    if method == "random":
        return Curation(_random_sample(corpus_size, excluded, cfg.final_size, seed), {})
    assert corpus_emb is not None and seed_emb is not None, f"method {method!r} needs embeddings"
    source = _as_source(corpus_emb)
    if source.num_rows != corpus_size:
        raise CurationError(
            f"the corpus embeddings have {source.num_rows} rows for a corpus of {corpus_size}; "
            "re-run their stage"
        )
    mask = np.zeros(corpus_size, dtype=bool)
    mask[list(excluded)] = True
    if ids is not None and len(ids) != corpus_size:
        raise CurationError(
            f"ids has {len(ids)} entries for a corpus of {corpus_size} rows; give one id per row"
        )
    priority = None if ids is None else retrieval.tie_priority(ids, seed)
    fuse = fusion_emb is not None and method != "sentence"
    depth = 2 * cfg.final_size if fuse else cfg.final_size
    round_cfg = cfg.model_copy(update={"final_size": depth})
    voted, summary, scores = _vote_round(source, seed_emb, mask, round_cfg, seed, priority)
    if cfg.expand_seeds > 0 and voted:
        pseudo = [v.row for v in voted[: cfg.expand_seeds]]
        found = source.gather(pseudo)
        seed_emb = {layer: np.concatenate([codes, found[layer]]) for layer, codes in seed_emb.items()}
        voted, summary, scores = _vote_round(source, seed_emb, mask, round_cfg, seed, priority)
        summary["pseudo_seeds"] = len(pseudo)
    if fuse:
        assert fusion_emb is not None
        plain = round_cfg.model_copy(update={"layer_weighting": "vote"})
        other, _, _ = _vote_round(_as_source(fusion_emb[0]), fusion_emb[1], mask, plain, seed, priority)
        voted = _fused(voted, other, cfg.final_size, priority)
        summary["fusion"] = {
            "with": "sentence",
            "k": 60,
            "depth": depth,
            "in_both": sum(-1 in v.layers and v.votes > 0 for v in voted),
        }
    summary.update(
        excluded_seed_copies=len(excluded), layer_weighting=cfg.layer_weighting, seed_pooling=cfg.seed_pooling
    )
    if cfg.seed_pooling == "softmax":
        summary["seed_temperature"] = cfg.seed_temperature
    return Curation(voted, summary, scores)


def _vote_round(
    source: EmbeddingSource,
    seed_emb: Mapping[int, np.ndarray],
    mask: np.ndarray,
    cfg: CurateConfig,
    seed: int,
    priority: np.ndarray | None,
) -> tuple[list[retrieval.VotedRecord], dict[str, Any], np.ndarray]:
    """One retrieval round: widened per-layer top-M, layer weights, the vote; its summary and every
    row's score."""
    sample = quality_sample(source.num_rows, seed) if cfg.layer_weighting == "quality" else None
    result, top_m = _widened_selections(source, seed_emb, mask, cfg, priority, sample)
    selections = result.selections
    weights = layer_vote_weights(selections, result.sample or {}, seed_emb, cfg, seed, source.num_rows)
    voted = retrieval.vote(selections, cfg.final_size, weights=weights, priority=priority)
    per_layer: dict[int, dict[str, float]] = {
        s.layer: {"mean_top_score": float(np.mean(s.scores)) if len(s.scores) else 0.0} for s in selections
    }
    if weights is not None:  # only then: a plain vote's summary stays as it always was
        for layer, weight in weights.items():
            per_layer[layer]["weight"] = weight
    return voted, {"per_layer": per_layer, "effective_top_m": top_m}, result.mean_scores


def _fused(
    primary: list[retrieval.VotedRecord],
    sentence: list[retrieval.VotedRecord],
    final_size: int,
    priority: np.ndarray | None,
) -> list[retrieval.VotedRecord]:
    """Reciprocal-rank fusion of the method's voted ranking with the sentence baseline's."""
    by_row = {v.row: v for v in primary}
    in_sentence = {v.row for v in sentence}
    fused = retrieval.reciprocal_rank_fusion(
        [[v.row for v in primary], [v.row for v in sentence]], final_size, priority=priority
    )
    out = []
    for row, score, _ in fused:
        own = by_row.get(row)
        layers = (list(own.layers) if own else []) + ([-1] if row in in_sentence else [])
        out.append(
            retrieval.VotedRecord(row=row, votes=own.votes if own else 0.0, mean_score=score, layers=layers)
        )
    return out


def _random_sample(
    corpus_size: int, excluded: set[int], final_size: int, seed: int
) -> list[retrieval.VotedRecord]:
    """The `random` baseline: a seeded uniform sample of the rows not excluded, in seeded order."""
    pool = [i for i in range(corpus_size) if i not in excluded]
    rows = [pool[i] for i in sample_rows(len(pool), final_size, seed)]
    np.random.default_rng(seed).shuffle(rows)
    return [retrieval.VotedRecord(row=r, votes=0.0, mean_score=0.0, layers=[]) for r in rows]


def quality_sample(corpus_size: int, seed: int, sample_size: int = 8192) -> np.ndarray:
    """The corpus rows `retrieval.layer_weights` measures a layer on, sorted (the same rows in every
    layer)."""
    return np.sort(
        np.random.default_rng(seed).choice(corpus_size, size=min(corpus_size, sample_size), replace=False)
    )


def seed_pooling(cfg: CurateConfig) -> retrieval.SeedPooling:
    """How `cfg` pools a record's cosines to the seeds into its score (`curate.seed_pooling`)."""
    return retrieval.SeedPooling(cfg.seed_pooling, cfg.seed_temperature)


def _widened_selections(
    source: EmbeddingSource,
    seed_emb: Mapping[int, np.ndarray],
    mask: np.ndarray,
    cfg: CurateConfig,
    priority: np.ndarray | None = None,
    sample: np.ndarray | None = None,
) -> tuple[StreamResult, int]:
    """Per-layer top-M lists whose union can fill `final_size`, and the M that took.

    The vote ranks the union of the per-layer lists, so M is doubled from `cfg.top_m` until that
    union holds `final_size` rows or M covers every row not excluded (`mask`); each try is one pass.
    """
    usable = int((~mask).sum())
    exclude = mask if mask.any() else None
    top_m = cfg.top_m
    while True:
        result = stream_topm(
            source,
            seed_emb,
            top_m,
            exclude=exclude,
            priority=priority,
            sample_rows=sample,
            pooling=seed_pooling(cfg),
        )
        if not result.selections:
            raise CurationError(
                "no layer gave the seeds a usable embedding (all-zero codes); lower curate.sae.l1_coef"
            )
        for layer in sorted(set(source.layers) - {s.layer for s in result.selections}):
            log.warning("layer %d: every seed has an all-zero code; the layer is left out of the vote", layer)
        union = len(set().union(*(s.rows.tolist() for s in result.selections)))
        if union >= cfg.final_size or top_m >= usable:
            break
        top_m = min(2 * top_m, usable)
    if top_m != cfg.top_m:
        log.info("per-layer top-%d left fewer than %d records; used top-%d", cfg.top_m, cfg.final_size, top_m)
    return result, top_m


def layer_vote_weights(
    selections: Sequence[retrieval.LayerSelection],
    corpus_sample: Mapping[int, np.ndarray],
    seed_emb: Mapping[int, np.ndarray],
    cfg: CurateConfig,
    seed: int,
    corpus_size: int,
) -> dict[int, float] | None:
    """The vote weight of each voting layer under `cfg.layer_weighting`; None for the plain vote.

    "quality" weights come from `retrieval.layer_weights` on the seeds that vote in each layer (those
    with a non-zero code) against the corpus rows of `quality_sample` (`corpus_sample`: their
    embeddings per layer, collected during the pass); "agreement" weights from
    `retrieval.agreement_weights` on the layers' lists themselves.

    Raises:
        CurationError: "quality" with fewer than 2 usable seeds in a voting layer (leave-one-out needs 2).
    """
    if cfg.layer_weighting == "vote":
        return None
    if cfg.layer_weighting == "agreement":
        return retrieval.agreement_weights(selections, corpus_size)
    seeds = {s.layer: _usable_seeds(np.asarray(seed_emb[s.layer])) for s in selections}
    few = {layer: len(codes) for layer, codes in seeds.items() if len(codes) < 2}
    if few:
        raise CurationError(
            "curate.layer_weighting=quality weighs each layer by leaving one seed out, so every voting "
            f"layer needs at least 2 seeds with a non-zero code; seeds per layer: {few}. "
            "Add seeds or set curate.layer_weighting: vote"
        )
    # The sample holds at most `sample_size` rows, so layer_weights takes all of them, in order.
    return retrieval.layer_weights(seeds, {layer: corpus_sample[layer] for layer in seeds}, seed=seed)


def _usable_seeds(seeds: np.ndarray) -> np.ndarray:
    """The seeds with a direction: a sparse code can be all zero for a seed, and then it cannot vote."""
    usable: np.ndarray = seeds[np.linalg.norm(seeds, axis=1) > 0]
    return usable

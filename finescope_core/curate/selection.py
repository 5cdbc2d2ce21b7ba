"""Curation stages over local directories: each reads its inputs, writes its outputs, returns a summary.

The Prefect tasks in `tasks/curate.py` are thin adapters around these functions (store look-up,
cache key, commit); anything that computes lives here or in the per-stage modules it calls.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core import activations, retrieval, sae, saliency
from finescope_core.batching import TextBatch, iter_text_batches
from finescope_core.config import CurateConfig
from finescope_core.data import Record, RecordSet
from finescope_core.hooks import resolve_layers
from finescope_core.io import write_jsonl
from finescope_core.progress import Progress, no_progress
from finescope_core.retrieval.stream import (
    Block,
    DenseSource,
    EmbeddingSource,
    StreamResult,
    gather_from_blocks,
    stream_topm,
)

log = logging.getLogger(__name__)

OUTPUT_FIELDS = ("rank", "score", "votes", "layers")
"""Columns finescope adds to each curated record; input fields with these names are kept as `input_<name>`."""


class CurationError(ValueError):
    """A curation setting does not fit the model or data; the message names the field."""


def hooked_layers(num_hidden_layers: int, cfg: CurateConfig) -> list[int]:
    """The decoder layers to hook, ascending: `cfg.layers` (checked by `hooks.resolve_layers`) or
    `cfg.num_layers` evenly spaced.

    The automatic choice skips the first layers, whose outputs are still close to the token embeddings.

    Raises:
        LayerSelectionError: `cfg.layers` is empty, out of range or names a layer twice.
    """
    if cfg.layers is not None:
        return sorted(resolve_layers(cfg.layers, num_hidden_layers, setting="curate.layers"))
    count = min(cfg.num_layers, num_hidden_layers)
    start = min(2, num_hidden_layers - count)
    return sorted({round(x) for x in np.linspace(start, num_hidden_layers - 1, count)})


def check_curation_fits(cfg: CurateConfig, hidden_size: int) -> None:
    """Refuse settings that cannot work on this model, before any model work."""
    if cfg.method in ("sae", "activation") and cfg.k_act > hidden_size:
        raise CurationError(
            f"curate.k_act={cfg.k_act} exceeds the model's hidden size {hidden_size}; use at most {hidden_size}"
        )


def _sample_rows(n: int, k: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[: min(k, n)].tolist())


# --- saliency ---------------------------------------------------------------------------------------


def saliency_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: RecordSet,
    layers: list[int],
    cfg: CurateConfig,
    seed: int,
    out_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Score every coordinate of every hooked layer on D0 (a seeded corpus sample) and keep the top k_act."""
    rows = _sample_rows(len(corpus), cfg.reference_size, seed)
    texts = [corpus.records[i].text for i in rows]
    # A list, not a generator: progress needs the total up front.
    batches = list(iter_text_batches(tokenizer, texts, max_length=cfg.max_length, batch_size=cfg.batch_size))
    if cfg.selector == "jacobian":
        gen = torch.Generator(device=model.device).manual_seed(seed)
        scores = saliency.jacobian_saliency(
            model,
            batches,
            layers,
            probes=cfg.probes,
            skip_first=cfg.skip_first,
            generator=gen,
            progress=progress,
        )
    else:
        pooled = _pooled_all(model, batches, layers, cfg.skip_first, len(texts), progress)
        scores = saliency.statistic_scores(pooled, cfg.selector)
    indices = saliency.select_coordinates(scores, cfg.k_act)
    result = saliency.LayerSaliency(layers=layers, scores=scores, indices=indices, selector=cfg.selector)
    result.save(out_dir)
    return {"layers": layers, "k_act": cfg.k_act, "reference_rows": len(rows), "selector": cfg.selector}


def _pooled_all(
    model: PreTrainedModel,
    batches: list[TextBatch],
    layers: list[int],
    skip_first: int,
    n: int,
    progress: Progress,
) -> torch.Tensor:
    """[n, L, d] pooled activations of every text in `batches`, rows in text order."""
    out: torch.Tensor | None = None
    for rows, acts in activations.extract_pooled(
        model, batches, layers, skip_first=skip_first, indices=None, progress=progress
    ):
        if out is None:
            out = torch.empty(n, *acts.shape[1:], dtype=acts.dtype)
        out[rows] = acts.to(out.dtype)
    assert out is not None
    return out


# --- activations ------------------------------------------------------------------------------------


def activation_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: RecordSet,
    layers: list[int],
    indices: torch.Tensor | None,
    cfg: CurateConfig,
    out_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Pooled activations of `records` at the selected coordinates, every layer from one pass, sharded."""
    manifest = activations.write_activation_shards(
        model,
        tokenizer,
        records.texts,
        layers,
        out_dir,
        indices=indices,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        skip_first=cfg.skip_first,
        shard_size=cfg.shard_size,
        progress=progress,
    )
    return {"layers": layers, "rows": len(records), "shards": len(manifest.shards)}


# --- SAE --------------------------------------------------------------------------------------------


def sae_stage(
    acts_dirs: Path | Sequence[Path],
    layers: list[int],
    indices: torch.Tensor,
    cfg: CurateConfig,
    seed: int,
    out_dir: Path,
    progress: Progress = no_progress,
    positions: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train one SAE per layer (batched) on the corpus activations, on `device`; save each with its metrics.

    Args:
        acts_dirs: the corpus activation directory, or its shard directories in order.
        layers: the model layer of each position of the activations' L axis.
        indices: [L, k_act] coordinates the activations hold, recorded with each SAE.
        positions: train only these positions of the L axis (one fanned-out task's share); None: all.
            Each layer's SAE depends only on (seed, layer), so any split gives the same SAEs.
    """
    picked = list(range(len(layers))) if positions is None else list(positions)
    dirs = [Path(acts_dirs)] if isinstance(acts_dirs, str | Path) else list(acts_dirs)
    total = activations.num_rows(dirs)
    if total > cfg.sae.max_rows:  # a seeded sample, the same rows for every layer (and every layer group)
        rows = _sample_rows(total, cfg.sae.max_rows, seed)
        acts = activations.load_activation_rows(dirs, rows, positions=picked)
        log.info("sae training on %d of %d corpus records (curate.sae.max_rows)", len(rows), total)
    else:
        acts = activations.load_activations(dirs, positions=picked)
    ids = [layers[i] for i in picked]
    model, metrics = sae.train_saes(acts, cfg.sae, seed=seed, progress=progress, layer_ids=ids, device=device)
    extra = [{"coordinates": indices[i].tolist()} for i in picked]
    sae.save_saes(model, metrics, ids, out_dir, extra, cfg=cfg.sae)
    return {"layers": ids, "metrics": [_metric_summary(m) for m in metrics]}


def _metric_summary(m: sae.LayerMetrics) -> dict[str, Any]:
    """What the stage summary keeps of a layer's metrics: the final numbers (training and held-out rows), not the curves."""
    return m.summary()


# --- retrieval and output ---------------------------------------------------------------------------


def _usable_seeds(seeds: np.ndarray) -> np.ndarray:
    """The seeds with a direction: a sparse code can be all zero for a seed, and then it cannot vote."""
    usable: np.ndarray = seeds[np.linalg.norm(seeds, axis=1) > 0]
    return usable


def sae_codes(
    corpus_acts: Path | Sequence[Path], seed_acts: Path | Sequence[Path], sae_dir: Path
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """SAE codes per layer for corpus and seeds: ({layer: [N,d_sae]}, {layer: [S,d_sae]})."""
    model, layers, _ = sae.load_saes(sae_dir)
    corpus = sae.encode(model, activations.load_activations(corpus_acts))
    seeds = sae.encode(model, activations.load_activations(seed_acts))
    return _split_layers(corpus, layers), _split_layers(seeds, layers)


def raw_activation_embeddings(
    corpus_acts: Path | Sequence[Path], seed_acts: Path | Sequence[Path], layers: list[int]
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Pooled activations z-scored per coordinate with corpus statistics (the `activation` baseline)."""
    corpus = activations.load_activations(corpus_acts).float()
    seeds = activations.load_activations(seed_acts).float()
    mean, std = corpus.mean(0, keepdim=True), corpus.std(0, keepdim=True).clamp_min(1e-6)
    return _split_layers((corpus - mean) / std, layers), _split_layers((seeds - mean) / std, layers)


class ZScoredActivations:
    """The `activation` baseline's corpus side as an `EmbeddingSource`: each activation directory (one
    corpus shard) a block, z-scored per coordinate with the corpus mean and standard deviation (one
    pass over the shards when built, float64 sums)."""

    def __init__(self, dirs: Sequence[Path], layers: Sequence[int]):
        self.dirs, self._layers = [Path(d) for d in dirs], list(layers)
        if not self.dirs:
            raise CurationError("no corpus activation directories given; run the activations stage first")
        total: torch.Tensor | None = None
        squares: torch.Tensor | None = None
        self._sizes = []
        for d in self.dirs:
            x = activations.load_activations(d).double()
            total = x.sum(0) if total is None else total + x.sum(0)
            squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
            self._sizes.append(x.shape[0])
        assert total is not None and squares is not None
        n = sum(self._sizes)
        mean = total / n
        var = ((squares - n * mean * mean) / max(1, n - 1)).clamp_min(0)
        self.mean, self.std = mean.float()[None], var.sqrt().float().clamp_min(1e-6)[None]

    @property
    def layers(self) -> list[int]:
        return self._layers

    @property
    def num_rows(self) -> int:
        return sum(self._sizes)

    def scaled(self, x: torch.Tensor) -> dict[int, np.ndarray]:
        """Activations [n, L, k] z-scored with the corpus statistics, per layer."""
        return _split_layers((x.float() - self.mean) / self.std, self._layers)

    def blocks(self) -> Iterator[Block]:
        start = 0
        for d, n in zip(self.dirs, self._sizes, strict=True):
            yield Block(start, self.scaled(activations.load_activations(d)))
            start += n

    def gather(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        return gather_from_blocks(self.blocks(), rows)


def _split_layers(x: torch.Tensor, layers: Sequence[int]) -> dict[int, np.ndarray]:
    return {layer: x[:, i].contiguous().float().numpy() for i, layer in enumerate(layers)}


def curated_rows(corpus: RecordSet, voted: Sequence[retrieval.VotedRecord]) -> list[dict[str, Any]]:
    """The output records: original fields (with id) + rank, score, votes, layers."""
    rows = []
    for rank, v in enumerate(voted, start=1):
        record: Record = corpus.records[v.row]
        fields = {(f"input_{k}" if k in OUTPUT_FIELDS else k): val for k, val in record.fields.items()}
        score = float(v.mean_score) if math.isfinite(v.mean_score) else 0.0
        rows.append(
            {**fields, "rank": rank, "score": score, "votes": float(v.votes), "layers": list(v.layers)}
        )
    return rows


def write_curated(rows: list[dict[str, Any]], out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write curated.jsonl, curated.parquet and curation.json into out_dir."""
    write_jsonl(rows, out_dir / "curated.jsonl")
    pq.write_table(_arrow_table(rows), out_dir / "curated.parquet")
    summary = {"records": len(rows), **summary}  # first: `store ls` shows the leading info fields
    (out_dir / "curation.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _arrow_table(rows: list[dict[str, Any]]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Heterogeneous user fields (a column that is a string here and a list there): keep them as JSON text.
        fixed = [
            {
                k: (v if k in OUTPUT_FIELDS or isinstance(v, str) else json.dumps(v, default=str))
                for k, v in r.items()
            }
            for r in rows
        ]
        return pa.Table.from_pylist(fixed)


Embeddings = Mapping[int, np.ndarray] | EmbeddingSource
"""A corpus's embeddings per layer: in memory ({layer: [N, d]}) or read block by block (a source)."""


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
            f"the corpus embeddings have {source.num_rows} rows for a corpus of {corpus_size}; re-run their stage"
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
    """One retrieval round: widened per-layer top-M, layer weights, the vote; its summary and every row's score."""
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
    rows = [pool[i] for i in _sample_rows(len(pool), final_size, seed)]
    np.random.default_rng(seed).shuffle(rows)
    return [retrieval.VotedRecord(row=r, votes=0.0, mean_score=0.0, layers=[]) for r in rows]


def quality_sample(corpus_size: int, seed: int, sample_size: int = 8192) -> np.ndarray:
    """The corpus rows `retrieval.layer_weights` measures a layer on, sorted (the same rows in every layer)."""
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
            f"curate.layer_weighting=quality weighs each layer by leaving one seed out, so every voting layer needs "
            f"at least 2 seeds with a non-zero code; seeds per layer: {few}. Add seeds or set curate.layer_weighting: vote"
        )
    # The sample holds at most `sample_size` rows, so layer_weights takes all of them, in order.
    return retrieval.layer_weights(seeds, {layer: corpus_sample[layer] for layer in seeds}, seed=seed)


SCORES_FILE = "scores.safetensors"


def save_scores(path: Path, mean_scores: np.ndarray, seed_emb: Mapping[int, np.ndarray]) -> None:
    """Keep every corpus record's score (4 bytes a record, for the report's histogram) and the seeds'
    embeddings per layer; never the corpus's embeddings (they stay in their own stages)."""
    tensors = {"corpus_scores": torch.from_numpy(np.ascontiguousarray(mean_scores, dtype=np.float32))}
    tensors.update(
        {
            f"seeds.{k}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for k, v in seed_emb.items()
        }
    )
    save_file(tensors, str(path))


def load_scores(path: Path) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(every corpus record's mean score [N], {layer: seed embeddings}) that `save_scores` kept."""
    tensors = load_file(str(path))
    seeds = {int(k.split(".", 1)[1]): v.numpy() for k, v in tensors.items() if k.startswith("seeds.")}
    return tensors["corpus_scores"].numpy(), seeds


def method_embeddings(
    method: str,
    corpus: RecordSet,
    seeds: RecordSet,
    *,
    activations: tuple[Sequence[Path], Sequence[Path]] | None = None,
    layers: Sequence[int] = (),
    sae_dir: Path | None = None,
    sentence_corpus: np.ndarray | None = None,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> tuple[dict[int, np.ndarray] | None, dict[int, np.ndarray] | None]:
    """What each method retrieves with, per layer: (corpus, seeds) embeddings (None, None for `random`).

    `sentence` embeds the texts (one pseudo-layer, -1), the corpus's only when `sentence_corpus`
    (its cached embeddings, `sentence.read_corpus_embeddings`) is not given; `activation` reads the
    pooled activations at the saliency-selected coordinates; `sae` encodes them with each layer's SAE.
    """
    if method == "random":
        return None, None
    if method == "sentence":
        from finescope_core.sentence import sentence_embeddings

        if sentence_corpus is not None and sentence_corpus.shape[0] != len(corpus):
            raise CurationError(
                f"the cached sentence embeddings have {sentence_corpus.shape[0]} rows for a corpus of {len(corpus)}"
            )
        corpus_emb = (
            sentence_corpus
            if sentence_corpus is not None
            else sentence_embeddings(corpus.texts, device=device, progress=progress)
        )
        return {-1: corpus_emb}, {-1: sentence_embeddings(seeds.texts, device=device)}
    if activations is None:
        raise CurationError(
            f"curate.method {method!r} needs the corpus and seed activations; run their stages first"
        )
    corpus_dirs, seed_dirs = activations
    if method == "activation":
        return raw_activation_embeddings(corpus_dirs, seed_dirs, list(layers))
    if sae_dir is None:
        raise CurationError("curate.method 'sae' needs the trained SAEs; run the sae stage first")
    return sae_codes(corpus_dirs, seed_dirs, sae_dir)


def streamed_embeddings(
    method: str,
    corpus_acts: Sequence[Path],
    seed_acts: Sequence[Path],
    layers: Sequence[int],
    *,
    sae_dir: Path | None = None,
    code_dirs: Sequence[Path] | None = None,
) -> tuple[EmbeddingSource, dict[int, np.ndarray]]:
    """The corpus side of `sae` or `activation` as a source read shard by shard, and the seeds' embeddings.

    `sae` reads the corpus's stored sparse codes (`code_dirs`, the `sae-codes` stage) and encodes the
    seeds' activations with the SAEs of `sae_dir`; `activation` z-scores each corpus shard with the
    corpus statistics. Equal to `method_embeddings` (up to the stored codes' precision and `code_k`).
    """
    if method == "activation":
        source = ZScoredActivations(corpus_acts, layers)
        return source, source.scaled(activations.load_activations(seed_acts))
    if method != "sae":
        raise CurationError(f"curate.method {method!r} is not read from shards; use method_embeddings")
    if sae_dir is None or code_dirs is None:
        raise CurationError(
            "curate.method 'sae' needs the trained SAEs and the corpus codes; run the sae and sae-codes stages first"
        )
    from finescope_core.sae.codes import SparseCodeSource

    model, sae_layers, _ = sae.load_saes(sae_dir)
    codes = SparseCodeSource(code_dirs)
    if codes.layers != list(sae_layers):
        raise CurationError(
            f"the stored codes are of layers {codes.layers}, the SAEs of {sae_layers}; re-run the sae-codes stage"
        )
    return codes, _split_layers(sae.encode(model, activations.load_activations(seed_acts)), sae_layers)

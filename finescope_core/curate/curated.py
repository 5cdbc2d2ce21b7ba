"""The `curated` stage: what the method retrieves with, the retrieval and vote (fused with the sentence
ranking under `curate.fusion: sentence`), never a held-out record or a copy of a seed; the curated set,
its summary and every record's score written into the work directory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finescope_core import sentence
from finescope_core.config import CurateConfig
from finescope_core.curate.curated_set import SCORES_FILE, curated_rows, save_scores, write_curated
from finescope_core.curate.embeddings import Embeddings, method_embeddings, streamed_embeddings
from finescope_core.curate.selection import curate_records
from finescope_core.data import RecordSet, seed_copies
from finescope_core.progress import Progress, no_progress
from finescope_core.sae.codes import SparseCodeSource
from finescope_core.stage import StageContext


@dataclass(frozen=True)
class CurateInputs:
    """What the `curated` stage reads: the records, the ids held out, and per method the artifacts of
    the stages it retrieves with (local directories; None where the method reads none)."""

    corpus: RecordSet
    seeds: RecordSet
    held_out_ids: frozenset[str] = frozenset()
    """Ids of the corpus records held out for evaluation (the holdout's `excluded`): never selected."""
    corpus_activations: Sequence[Path] | None = None
    """The corpus's activation shard directories in row order (`sae`, `activation`)."""
    seed_activations: Sequence[Path] | None = None
    """The seeds' activation shard directories in row order (`sae`, `activation`)."""
    layers: Sequence[int] = ()
    """The hooked layer of each position of the activations' L axis."""
    sae_dir: Path | None = None
    """The `sae` artifact: every hooked layer's SAE (`sae`)."""
    code_dirs: Sequence[Path] | None = None
    """The `sae-codes` artifacts, one per corpus shard in row order (`sae`)."""
    sentence_dir: Path | None = None
    """The `sentence-embeddings` artifact (`curate.method: sentence` or `curate.fusion: sentence`)."""
    sentence_ref: Mapping[str, str] | None = None
    """What the summary names that artifact by: its `key` and `uri`."""


def run(
    inputs: CurateInputs,
    section: CurateConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """The `curated` stage's entry: the curated set of `section.method` written into `work_dir`.

    `progress` follows the texts' embedding (`sentence` without the corpus's cached embeddings).
    Returns the stage summary (`curation.json`, the stage's info).
    """
    corpus, seeds = inputs.corpus, inputs.seeds
    cached = (
        sentence.read_corpus_embeddings(inputs.sentence_dir, len(corpus))
        if inputs.sentence_dir is not None
        else None
    )
    corpus_emb, seed_emb, codes_info = _method_embeddings(inputs, section, cached, ctx.device, progress)
    fusion: tuple[Embeddings, dict[int, np.ndarray]] | None = None
    if cached is not None and section.method != "sentence":  # curate.fusion: sentence
        f_corpus, f_seeds = method_embeddings(
            "sentence", corpus, seeds, sentence_corpus=cached, device=ctx.device
        )
        assert f_corpus is not None and f_seeds is not None
        fusion = (f_corpus, f_seeds)
    copies = seed_copies(corpus, seeds)
    held = {i for i, r in enumerate(corpus.records) if r.id in inputs.held_out_ids}
    result = curate_records(
        section.method,
        corpus_emb,
        seed_emb,
        len(corpus),
        section,
        ctx.seed,
        sorted(set(copies) | held),
        ids=[r.id for r in corpus.records],
        fusion_emb=fusion,
    )
    if result.mean_scores is not None and seed_emb is not None:
        save_scores(work_dir / SCORES_FILE, result.mean_scores, seed_emb)
    extra = result.summary
    if "excluded_seed_copies" in extra:  # the held-out records are excluded too, but counted by the holdout
        extra["excluded_seed_copies"] = len(copies)
    summary = {
        "method": section.method,
        "corpus_records": len(corpus),
        "seed_records": len(seeds),
        **extra,
        **codes_info,
    }
    if inputs.sentence_ref is not None:
        summary["sentence_embeddings"] = dict(inputs.sentence_ref)
    return write_curated(curated_rows(corpus, result.voted), work_dir, summary)


def _method_embeddings(
    inputs: CurateInputs,
    section: CurateConfig,
    cached: np.ndarray | None,
    device: str,
    progress: Progress,
) -> tuple[Embeddings | None, dict[int, np.ndarray] | None, dict[str, Any]]:
    """(corpus, seeds) embeddings of `section.method`, and what the summary says of the stored codes.

    `sae` and `activation` read the corpus shard by shard (`streamed_embeddings`); the others embed
    in memory (`method_embeddings`), `sentence` with the corpus's cached embeddings when given.
    """
    method = section.method
    if method not in ("sae", "activation"):
        corpus_emb, seed_emb = method_embeddings(
            method, inputs.corpus, inputs.seeds, sentence_corpus=cached, device=device, progress=progress
        )
        return corpus_emb, seed_emb, {}
    assert inputs.corpus_activations is not None and inputs.seed_activations is not None
    source, seed_emb = streamed_embeddings(
        method,
        inputs.corpus_activations,
        inputs.seed_activations,
        inputs.layers,
        sae_dir=inputs.sae_dir,
        code_dirs=inputs.code_dirs,
    )
    codes_info = {"codes": source.info()} if isinstance(source, SparseCodeSource) else {}
    return source, seed_emb, codes_info

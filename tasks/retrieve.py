"""Task of the `curated` stage: retrieval per layer, the vote across layers, the curated set.

With `curate.method: sentence` (or `curate.fusion: sentence`) the task first looks up (or
computes) the `sentence-embeddings` stage: the corpus's MiniLM embeddings, keyed by the corpus
alone, so another seed set embeds only its seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finescope_core import sentence
from finescope_core.config import CurateConfig
from finescope_core.curate import curated
from finescope_core.curate.curated_set import CURATED_FILE, CURATED_PARQUET, SCORES_FILE, SUMMARY_FILE
from finescope_core.evaluate.split import Holdout
from finescope_core.stage import StageContext
from tasks.activations import activation_dirs
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, planned_after, run_cached
from tasks.codes import code_dirs
from tasks.context import RunContext
from tasks.data import load_data
from tasks.keymodels import StageKey, StageKeyModel
from tasks.planning import labelled
from tasks.progress import Progress
from tasks.registry import Stage, declare, stage_task
from tasks.retries import STORE_RETRIES


class CuratedKey(StageKeyModel):
    """`curated`: retrieval and the vote, on corpus and seeds, their activations and the SAEs (per method),
    never picking a record held out for evaluation (the ids' hash is an input)."""

    STAGE = "curated"
    # 2: zero-score rows never selected, ties broken by a seeded hash of the id; the evaluation split excluded
    # 3: `sae` reads the stored sparse codes shard by shard; scores.safetensors instead of every record's
    # embeddings
    # 4: curate.seed_pooling (softmax over the seeds by default, was their maximum)
    VERSION = "4"
    CODE = (
        "finescope_core.curate",
        "finescope_core.retrieval",
        "finescope_core.retrieval.stream",
        "finescope_core.sae.codes",
    )
    CONFIG = {
        "method": "curate.method",
        "top_m": "curate.top_m",
        "final_size": "curate.final_size",
        "layer_weighting": "curate.layer_weighting",
        "fusion": "curate.fusion",
        "seed_pooling": "curate.seed_pooling",
        "seed_temperature": "curate.seed_temperature",
        "expand_seeds": "curate.expand_seeds",
        "code_k": "curate.code_k",
        "code_dtype": "curate.code_dtype",
        "seed": "seed",
    }

    method: str
    top_m: int
    final_size: int
    layer_weighting: str
    seed_pooling: str
    seed_temperature: float
    fusion: str
    expand_seeds: int
    code_k: int | str
    code_dtype: str
    seed: int


def needs_sentence(section: CurateConfig) -> bool:
    """Whether the retrieval reads the corpus's sentence embeddings (the method, or fusion with it)."""
    method = section.method
    return method == "sentence" or (section.fusion == "sentence" and method in ("sae", "activation"))


class SentenceKey(StageKeyModel):
    """`sentence-embeddings`: the corpus's all-MiniLM-L6-v2 embeddings; the corpus and the model pin only."""

    STAGE = "sentence-embeddings"
    VERSION = "1"
    CODE = ("finescope_core.sentence",)


def sentence_key(corpus_sha: str) -> StageKey:
    return SentenceKey(inputs={"corpus": corpus_sha, "model": sentence.MODEL_PIN}).spec()


def curated_key(
    section: CurateConfig,
    ctx: RunContext,
    corpus_sha: str,
    seeds_sha: str,
    acts_shas: list[str] | None,
    sae_sha: str | None,
    sentence_sha: str | None = None,
    excluded_sha: str = "",
) -> StageKey:
    inputs = {
        "corpus": corpus_sha,
        "seeds": seeds_sha,
        "activations": "+".join(acts_shas or []),
        "sae": sae_sha or "",
        "sentence": sentence_sha or "",
        "excluded": excluded_sha,
    }
    return CuratedKey.of(ctx.settings(curate=section), inputs).spec()


def _device(ctx: RunContext) -> str:
    return "cuda" if ctx.device != "cpu" and torch.cuda.is_available() else "cpu"


def _context(ctx: RunContext) -> StageContext:
    """Where the retrieval's own model work (the sentence encoder) runs, and the run's seed."""
    return StageContext(device=_device(ctx), dtype=ctx.precision().dtype, seed=ctx.seed)


def sentence_stage(section: CurateConfig, ctx: RunContext, corpus: StageManifest) -> StageManifest:
    """The corpus's sentence embeddings from the store, computed on a miss (a plain call, inside the task)."""
    store = ctx.store

    def build(work: Path) -> dict[str, Any]:
        inputs = sentence.SentenceInputs(texts=load_data(ctx, corpus).texts)
        return sentence.run(inputs, section, _context(ctx), work, Progress("sentence corpus embeddings"))

    with labelled("sentence-embeddings"):
        return run_cached(store, sentence_key(corpus.sha256), build)


SENTENCE = declare(
    Stage(
        "sentence-embeddings",
        SentenceKey,
        upstream=("corpus",),
        core=sentence.run,
        files=(sentence.CORPUS_FILE,),
    )
)
CURATED = Stage(
    "curated",
    CuratedKey,
    upstream=("corpus", "seeds", "activations", "sae", "sae-codes", "sentence-embeddings"),
    core=curated.run,
    files=(CURATED_FILE, CURATED_PARQUET, SUMMARY_FILE, SCORES_FILE),
)


@stage_task(CURATED, keyless=("codes",), cache_policy=RUN_RESULTS, **STORE_RETRIES)
def retrieve_task(
    section: CurateConfig,
    ctx: RunContext,
    corpus: StageManifest,
    seeds: StageManifest,
    acts: tuple[StageManifest, StageManifest] | None,
    sae: StageManifest | None,
    held: Holdout,
    codes: list[StageManifest] | None = None,
) -> StageManifest:
    """Eq. 12-13 per layer, the vote across layers, and the curated set (JSONL + Parquet); the records of
    `held` (the evaluation split, eval-file duplicates) and copies of seeds are never selected.

    `sae` and `activation` read the corpus shard by shard (`codes`: the corpus's sparse SAE codes per
    shard, for `sae`), so memory does not grow with the corpus beyond the records themselves and one
    score per record."""
    store = ctx.store
    sent = sentence_stage(section, ctx, corpus) if needs_sentence(section) else None
    waiting = planned_after("curated", sent)  # a dry run: the embeddings are still to compute
    if waiting is not None:
        return waiting

    def build(work: Path) -> dict[str, Any]:
        inputs = curated.CurateInputs(
            corpus=load_data(ctx, corpus),
            seeds=load_data(ctx, seeds),
            held_out_ids=frozenset(held.excluded),
            corpus_activations=activation_dirs(store, acts[0]) if acts else None,
            seed_activations=activation_dirs(store, acts[1]) if acts else None,
            layers=acts[0].info["layers"] if acts else [],
            sae_dir=artifact_dir(store, sae) if sae else None,
            code_dirs=code_dirs(ctx, codes) if codes else None,
            sentence_dir=artifact_dir(store, sent) if sent else None,
            sentence_ref={"key": sent.key, "uri": sent.uri} if sent else None,
        )
        progress = Progress(f"{section.method} embeddings")
        return curated.run(inputs, section, _context(ctx), work, progress)

    acts_shas = [a.sha256 for a in acts] if acts else None
    spec = curated_key(
        section,
        ctx,
        corpus.sha256,
        seeds.sha256,
        acts_shas,
        sae.sha256 if sae else None,
        sent.sha256 if sent else None,
        held.sha256(),
    )
    return run_cached(store, spec, build)

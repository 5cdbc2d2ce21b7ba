"""Task of the `curated` stage: retrieval per layer, the vote across layers, the curated set.

With `curate.method: sentence` (or `curate.fusion: sentence`) the task first looks up (or
computes) the `sentence-embeddings` stage: the corpus's MiniLM embeddings, keyed by the corpus
alone, so another seed set embeds only its seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task

from finescope_core import sentence
from finescope_core.config import FinescopeConfig
from finescope_core.curate import curated
from finescope_core.evaluate.split import Holdout
from finescope_core.stage import StageContext
from tasks.activations import activation_dirs
from tasks.codes import code_dirs
from tasks.common import (
    RUN_RESULTS,
    STORE_RETRIES,
    Progress,
    StageKey,
    StageKeyModel,
    StageManifest,
    artifact_dir,
    open_store,
    run_cached,
)
from tasks.data import load_data
from tasks.identity import work_precision


class CuratedKey(StageKeyModel):
    """`curated`: retrieval and the vote, on corpus and seeds, their activations and the SAEs (per method),
    never picking a record held out for evaluation (the ids' hash is an input)."""

    STAGE = "curated"
    # 2: zero-score rows never selected, ties broken by a seeded hash of the id; the evaluation split excluded
    # 3: `sae` reads the stored sparse codes shard by shard; scores.safetensors instead of every record's
    #    embeddings
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


def needs_sentence(cfg: FinescopeConfig) -> bool:
    """Whether the retrieval reads the corpus's sentence embeddings (the method, or fusion with it)."""
    method = cfg.curate.method
    return method == "sentence" or (cfg.curate.fusion == "sentence" and method in ("sae", "activation"))


class SentenceKey(StageKeyModel):
    """`sentence-embeddings`: the corpus's all-MiniLM-L6-v2 embeddings; the corpus and the model pin only."""

    STAGE = "sentence-embeddings"
    VERSION = "1"
    CODE = ("finescope_core.sentence",)


def sentence_key(corpus_sha: str) -> StageKey:
    return SentenceKey(inputs={"corpus": corpus_sha, "model": sentence.MODEL_PIN}).spec()


def curated_key(
    cfg: FinescopeConfig,
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
    return CuratedKey.of(cfg, inputs).spec()


def _device(cfg: FinescopeConfig) -> str:
    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


def _context(cfg: FinescopeConfig) -> StageContext:
    """Where the retrieval's own model work (the sentence encoder) runs, and the run's seed."""
    return StageContext(device=_device(cfg), dtype=work_precision(cfg).dtype, seed=cfg.seed)


def sentence_stage(cfg: FinescopeConfig, corpus: StageManifest) -> StageManifest:
    """The corpus's sentence embeddings from the store, computed on a miss (a plain call, inside the task)."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        inputs = sentence.SentenceInputs(texts=load_data(cfg, corpus).texts)
        return sentence.run(inputs, cfg.curate, _context(cfg), work, Progress("sentence corpus embeddings"))

    return run_cached(store, sentence_key(corpus.sha256), build)


@task(name="retrieve", cache_policy=RUN_RESULTS, **STORE_RETRIES)
def retrieve_task(
    cfg: FinescopeConfig,
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
    store = open_store(cfg)
    sent = sentence_stage(cfg, corpus) if needs_sentence(cfg) else None

    def build(work: Path) -> dict[str, Any]:
        inputs = curated.CurateInputs(
            corpus=load_data(cfg, corpus),
            seeds=load_data(cfg, seeds),
            held_out_ids=frozenset(held.excluded),
            corpus_activations=activation_dirs(store, acts[0]) if acts else None,
            seed_activations=activation_dirs(store, acts[1]) if acts else None,
            layers=acts[0].info["layers"] if acts else [],
            sae_dir=artifact_dir(store, sae) if sae else None,
            code_dirs=code_dirs(cfg, codes) if codes else None,
            sentence_dir=artifact_dir(store, sent) if sent else None,
            sentence_ref={"key": sent.key, "uri": sent.uri} if sent else None,
        )
        progress = Progress(f"{cfg.curate.method} embeddings")
        return curated.run(inputs, cfg.curate, _context(cfg), work, progress)

    acts_shas = [a.sha256 for a in acts] if acts else None
    spec = curated_key(
        cfg,
        corpus.sha256,
        seeds.sha256,
        acts_shas,
        sae.sha256 if sae else None,
        sent.sha256 if sent else None,
        held.sha256(),
    )
    return run_cached(store, spec, build)

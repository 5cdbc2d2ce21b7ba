"""Task of the `curated` stage: retrieval per layer, the vote across layers, the curated set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task

from finescope_core import curate as core
from finescope_core.config import FinescopeConfig
from finescope_core.data import (
    seed_copies,
)
from tasks.activations import activation_dirs
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


class CuratedKey(StageKeyModel):
    """`curated`: retrieval and the vote, on corpus and seeds, their activations and the SAEs (per method)."""

    STAGE = "curated"
    VERSION = "2"  # 2: zero-score rows never selected, ties broken by a seeded hash of the id
    CONFIG = {"method": "curate.method", "top_m": "curate.top_m", "final_size": "curate.final_size",
              "layer_weighting": "curate.layer_weighting", "seed": "seed"}  # fmt: skip

    method: str
    top_m: int
    final_size: int
    layer_weighting: str
    seed: int


def curated_key(
    cfg: FinescopeConfig, corpus_sha: str, seeds_sha: str, acts_shas: list[str] | None, sae_sha: str | None
) -> StageKey:
    inputs = {"corpus": corpus_sha, "seeds": seeds_sha, "activations": "+".join(acts_shas or []), "sae": sae_sha or ""}
    return CuratedKey.of(cfg, inputs).spec()


@task(name="retrieve", cache_policy=RUN_RESULTS, **STORE_RETRIES)
def retrieve_task(
    cfg: FinescopeConfig,
    corpus: StageManifest,
    seeds: StageManifest,
    acts: tuple[StageManifest, StageManifest] | None,
    sae: StageManifest | None,
) -> StageManifest:
    """Eq. 12-13 per layer, the vote across layers, and the curated set (JSONL + Parquet)."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        seed_records, corpus_records = load_data(cfg, seeds), load_data(cfg, corpus)
        corpus_emb, seed_emb = core.method_embeddings(
            cfg.curate.method, corpus_records, seed_records,
            activations=(activation_dirs(store, acts[0]), activation_dirs(store, acts[1])) if acts else None,
            layers=acts[0].info["layers"] if acts else (), sae_dir=artifact_dir(store, sae) if sae else None,
            device="cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu",
            progress=Progress(f"{cfg.curate.method} embeddings"),
        )  # fmt: skip
        if corpus_emb is not None:
            core.save_embeddings(work / "embeddings.safetensors", corpus_emb, seed_emb)
        excluded = seed_copies(corpus_records, seed_records)
        voted, extra = core.select_records(
            cfg.curate.method, corpus_emb, seed_emb, len(corpus_records), cfg.curate, cfg.seed, excluded,
            ids=[r.id for r in corpus_records.records],
        )
        rows = core.curated_rows(corpus_records, voted)
        summary = {"method": cfg.curate.method, "corpus_records": len(corpus_records), "seed_records": len(seed_records), **extra}
        return core.write_curated(rows, work, summary)

    acts_shas = [a.sha256 for a in acts] if acts else None
    return run_cached(store, curated_key(cfg, corpus.sha256, seeds.sha256, acts_shas, sae.sha256 if sae else None), build)

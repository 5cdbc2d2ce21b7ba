"""Prefect tasks of the `curate` flow: each resolves inputs, calls one core function, commits an artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from finescope_core import curate as core
from finescope_core.config import FinescopeConfig
from finescope_core.data import (
    PreparedCorpus,
    Record,
    RecordSet,
    check_sizes,
    load_records,
    prepare_corpus,
    write_jsonl,
)
from finescope_core.saliency import LayerSaliency
from finescope_core.sentence import sentence_embeddings
from tasks.common import (
    ModelRef,
    Progress,
    StageManifest,
    artifact_dir,
    cached_model,
    logger,
    model_ref,
    open_store,
    run_cached,
)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O trouble, never bad input or bad settings (ValueError and its subclasses)."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return False


IO_RETRIES: dict[str, Any] = dict(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_transient)
GPU_TAGS = ["finescope-gpu"]


def read_inputs(cfg: FinescopeConfig) -> tuple[RecordSet, PreparedCorpus]:
    """Load and validate seeds and corpus; no model work, nothing written."""
    options = cfg.storage.fsspec_options()
    seeds = load_records(cfg.seeds, role="seeds", storage_options=options)
    corpus = load_records(cfg.corpus, role="corpus", storage_options=options)
    prepared = prepare_corpus(corpus, seeds)
    check_sizes(prepared.corpus, needed=cfg.curate.final_size, what="curate.final_size")
    return seeds, prepared


def _write_records(path: Path, records: list[Record]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        write_jsonl(({"id": r.id, "text": r.text, "origin": r.origin, "fields": r.fields} for r in records), f)


def read_records(path: Path) -> RecordSet:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return RecordSet([Record(id=r["id"], text=r["text"], fields=r["fields"], origin=r["origin"]) for r in rows])


@task(name="data", cache_policy=NO_CACHE, **IO_RETRIES)
def data_task(cfg: FinescopeConfig) -> StageManifest:
    """Validated seeds and corpus (seed copies and exact duplicates removed), stored by content hash."""
    seeds, prepared = read_inputs(cfg)

    def build(work: Path) -> dict[str, Any]:
        _write_records(work / "seeds.jsonl", seeds.records)
        _write_records(work / "corpus.jsonl", prepared.corpus.records)
        return {
            "seeds": len(seeds),
            "corpus": len(prepared.corpus),
            "dropped_seed_copies": prepared.dropped_seed_copies,
            "dropped_duplicates": prepared.dropped_duplicates,
        }

    inputs = {"seeds": seeds.sha256, "corpus": prepared.corpus.sha256}
    return run_cached(open_store(cfg), "data", "1", {}, inputs, build)


def load_data(cfg: FinescopeConfig, data: StageManifest) -> tuple[RecordSet, RecordSet]:
    """(seeds, corpus) from a committed data artifact."""
    root = artifact_dir(open_store(cfg), data)
    return read_records(root / "seeds.jsonl"), read_records(root / "corpus.jsonl")


@task(name="model", cache_policy=NO_CACHE, **IO_RETRIES)
def model_task(cfg: FinescopeConfig) -> ModelRef:
    """Resolve the model (converting the bundled default once into the store)."""
    return model_ref(cfg, open_store(cfg))


def _model(cfg: FinescopeConfig, ref: ModelRef):
    return cached_model(ref.path, cfg.device)


def _saliency_config(cfg: FinescopeConfig, layers: list[int]) -> dict[str, Any]:
    c = cfg.curate
    return {
        "layers": layers, "selector": c.selector, "k_act": c.k_act, "probes": c.probes,
        "reference_size": c.reference_size, "max_length": c.max_length, "skip_first": c.skip_first, "seed": cfg.seed,
    }


@task(name="saliency", cache_policy=NO_CACHE, tags=GPU_TAGS)
def saliency_task(cfg: FinescopeConfig, ref: ModelRef, data: StageManifest, layers: list[int]) -> StageManifest:
    """Eq. 6-10: per-coordinate saliency of every hooked layer on D0; top-k_act indices per layer."""

    def build(work: Path) -> dict[str, Any]:
        model, tok = _model(cfg, ref)
        _, corpus = load_data(cfg, data)
        return core.saliency_stage(model, tok, corpus, layers, cfg.curate, cfg.seed, work, Progress(f"saliency ({cfg.curate.selector})"))

    inputs = {"model": ref.sha256, "data": data.sha256}
    return run_cached(open_store(cfg), "saliency", "1", _saliency_config(cfg, layers), inputs, build)


@task(name="activations", cache_policy=NO_CACHE, tags=GPU_TAGS)
def activations_task(
    cfg: FinescopeConfig, ref: ModelRef, data: StageManifest, layers: list[int], sal: StageManifest | None
) -> StageManifest:
    """Pooled activations of corpus and seeds at the selected coordinates (all coordinates without `sal`)."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        model, tok = _model(cfg, ref)
        seeds, corpus = load_data(cfg, data)
        indices = LayerSaliency.load(artifact_dir(store, sal)).indices if sal is not None else None
        return core.activation_stage(model, tok, corpus, seeds, layers, indices, cfg.curate, work, Progress("activations"))

    c = cfg.curate
    config = {"layers": layers, "max_length": c.max_length, "skip_first": c.skip_first}
    inputs = {"model": ref.sha256, "data": data.sha256, "saliency": sal.sha256 if sal else "all-coordinates"}
    return run_cached(store, "activations", "1", config, inputs, build)


@task(name="sae", cache_policy=NO_CACHE, tags=GPU_TAGS)
def sae_task(cfg: FinescopeConfig, acts: StageManifest, sal: StageManifest, layers: list[int]) -> StageManifest:
    """Eq. 3-5 / §6: one SAE per hooked layer, trained together as one batched module."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        indices = LayerSaliency.load(artifact_dir(store, sal)).indices
        return core.sae_stage(artifact_dir(store, acts), layers, indices, cfg.curate, cfg.seed, work, Progress("sae training"))

    config = {"sae": cfg.curate.sae.model_dump(), "seed": cfg.seed}
    return run_cached(store, "sae", "1", config, {"activations": acts.sha256, "saliency": sal.sha256}, build)


def _retrieval_config(cfg: FinescopeConfig) -> dict[str, Any]:
    c = cfg.curate
    return {"method": c.method, "top_m": c.top_m, "final_size": c.final_size, "seed": cfg.seed}


@task(name="retrieve", cache_policy=NO_CACHE)
def retrieve_task(
    cfg: FinescopeConfig, data: StageManifest, acts: StageManifest | None, sae: StageManifest | None
) -> StageManifest:
    """Eq. 12-13 per layer, the vote across layers, and the curated set (JSONL + Parquet)."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        seeds, corpus = load_data(cfg, data)
        corpus_emb, seed_emb = _embeddings(cfg, store, seeds, corpus, acts, sae)
        if corpus_emb is not None:
            core.save_embeddings(work / "embeddings.safetensors", corpus_emb, seed_emb)
        voted, extra = core.select_records(cfg.curate.method, corpus_emb, seed_emb, len(corpus), cfg.curate, cfg.seed)
        rows = core.curated_rows(corpus, voted)
        summary = {"method": cfg.curate.method, "corpus_records": len(corpus), "seed_records": len(seeds), **extra}
        return core.write_curated(rows, work, summary)

    inputs = {"data": data.sha256, "activations": acts.sha256 if acts else "", "sae": sae.sha256 if sae else ""}
    return run_cached(store, "curated", "1", _retrieval_config(cfg), inputs, build)


def _embeddings(cfg, store, seeds: RecordSet, corpus: RecordSet, acts, sae):
    method = cfg.curate.method
    if method == "random":
        return None, None
    if method == "sentence":
        progress = Progress("sentence embeddings")
        device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        corpus_emb = sentence_embeddings(corpus.texts, device=device, progress=progress)
        return {-1: corpus_emb}, {-1: sentence_embeddings(seeds.texts, device=device)}
    acts_dir = artifact_dir(store, acts)
    if method == "activation":
        layers = json.loads((acts_dir / "corpus" / "activations.json").read_text())["layers"]
        return core.raw_activation_embeddings(acts_dir, layers)
    logger().info("encoding corpus and seeds with the SAEs")
    return core.sae_codes(acts_dir, artifact_dir(store, sae))

"""Prefect tasks of the `curate` flow: each resolves inputs, calls one core function, commits an artifact."""

from __future__ import annotations

import json
import shutil
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
    deduplicate,
    load_records,
    seed_copies,
    write_jsonl,
)
from finescope_core.saliency import LayerSaliency
from finescope_core.sentence import sentence_embeddings
from finescope_core.store import ArtifactStore, StoreError, is_transient
from tasks.common import (
    RUN_RESULTS,
    ModelRef,
    Progress,
    StageKey,
    StageManifest,
    artifact_dir,
    logger,
    lookup_stage,
    model_ref,
    open_store,
    run_cached,
    storage_options,
    using_model,
)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O trouble, never bad input or bad settings (ValueError) nor a broken store (StoreError)."""
    try:
        state.result()
    except (ValueError, StoreError):
        return False
    except Exception:
        return True
    return False


def _retry_storage_outage(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a compute stage only when the store stayed unreachable through the store's own retries."""
    try:
        state.result()
    except Exception as e:
        return is_transient(e)
    return False


IO_RETRIES: dict[str, Any] = dict(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_transient)
# Compute stages: a model or data error must fail at once, but a longer storage outage is worth waiting out.
STORE_RETRIES: dict[str, Any] = dict(retries=2, retry_delay_seconds=[30, 60], retry_condition_fn=_retry_storage_outage)
GPU_TAGS = ["finescope-gpu"]
# Stage versions of the gathered artifacts (2: the fanned-out layout, shards listed by reference).
ACTIVATIONS_VERSION = "2"
SAE_VERSION = "2"


def read_inputs(cfg: FinescopeConfig) -> tuple[RecordSet, PreparedCorpus]:
    """Load and validate seeds and corpus; no model work, nothing written."""
    options = storage_options(cfg)
    seeds = load_records(cfg.seeds, role="seeds", storage_options=options)
    prepared = deduplicate(load_records(cfg.corpus, role="corpus", storage_options=options))
    usable = len(prepared.corpus) - len(seed_copies(prepared.corpus, seeds))
    check_sizes(usable, needed=cfg.curate.final_size, what="curate.final_size")
    return seeds, prepared


def _write_records(path: Path, records: list[Record]) -> None:
    # No origin paths: the artifact's hash (and every key downstream of it) must not change when the
    # same data moves, e.g. from a local directory to s3://.
    with open(path, "w", encoding="utf-8") as f:
        write_jsonl(({"id": r.id, "text": r.text, "fields": r.fields} for r in records), f)


def read_records(path: Path) -> RecordSet:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return RecordSet(
        [Record(id=r["id"], text=r["text"], fields=r["fields"], origin=f"{path.name}:{i}") for i, r in enumerate(rows, 1)]
    )


def records_key(stage: str, records_sha: str) -> StageKey:
    """`corpus` / `seeds`: the validated records, keyed by their content (`RecordSet.sha256`) alone."""
    return StageKey(stage, "1", {}, {"records": records_sha})


def _store_records(cfg: FinescopeConfig, stage: str, records: RecordSet, info: dict[str, Any]) -> StageManifest:
    def build(work: Path) -> dict[str, Any]:
        _write_records(work / "records.jsonl", records.records)
        return {"records": len(records), **info}

    return run_cached(open_store(cfg), records_key(stage, records.sha256), build)


@task(name="inputs", cache_policy=NO_CACHE, persist_result=False, **IO_RETRIES)
def inputs_task(cfg: FinescopeConfig) -> tuple[RecordSet, PreparedCorpus]:
    """`read_inputs` as a task, so transient read errors of remote inputs are retried."""
    return read_inputs(cfg)


@task(name="data", cache_policy=RUN_RESULTS, **IO_RETRIES)
def data_task(cfg: FinescopeConfig, inputs: tuple[RecordSet, PreparedCorpus]) -> tuple[StageManifest, StageManifest]:
    """Validated (corpus, seeds) from `inputs_task`, each stored by content hash; the corpus de-duplicated.

    They are separate artifacts so that everything computed from the corpus alone (saliency, corpus
    activations, SAEs) is reused when only the seeds change.
    """
    seeds, prepared = inputs
    corpus = _store_records(cfg, "corpus", prepared.corpus, {"dropped_duplicates": prepared.dropped_duplicates})
    return corpus, _store_records(cfg, "seeds", seeds, {})


def load_data(cfg: FinescopeConfig, records: StageManifest) -> RecordSet:
    """The records of a committed corpus/seeds artifact."""
    return read_records(artifact_dir(open_store(cfg), records) / "records.jsonl")


@task(name="model", cache_policy=RUN_RESULTS, **IO_RETRIES)
def model_task(cfg: FinescopeConfig) -> ModelRef:
    """Resolve the model (converting the bundled default once into the store)."""
    return model_ref(cfg.model, open_store(cfg))


def _model(cfg: FinescopeConfig, ref: ModelRef):
    return using_model(ref.path, cfg.device)


def saliency_key(cfg: FinescopeConfig, model_sha: str, corpus_sha: str, layers: list[int]) -> StageKey:
    """`saliency`: settings of the selector, on the model and the corpus artifact."""
    c = cfg.curate
    config = {
        "layers": layers, "selector": c.selector, "k_act": c.k_act, "probes": c.probes,
        "reference_size": c.reference_size, "max_length": c.max_length, "skip_first": c.skip_first, "seed": cfg.seed,
    }
    return StageKey("saliency", "1", config, {"model": model_sha, "corpus": corpus_sha})


@task(name="saliency", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def saliency_task(cfg: FinescopeConfig, ref: ModelRef, corpus: StageManifest, layers: list[int]) -> StageManifest:
    """Eq. 6-10: per-coordinate saliency of every hooked layer on D0; top-k_act indices per layer."""

    def build(work: Path) -> dict[str, Any]:
        with _model(cfg, ref) as (model, tok):
            return core.saliency_stage(model, tok, load_data(cfg, corpus), layers, cfg.curate, cfg.seed, work, Progress(f"saliency ({cfg.curate.selector})"))

    return run_cached(open_store(cfg), saliency_key(cfg, ref.sha256, corpus.sha256, layers), build)


def _activation_config(cfg: FinescopeConfig, layers: list[int]) -> dict[str, Any]:
    c = cfg.curate
    return {"layers": layers, "max_length": c.max_length, "skip_first": c.skip_first}


def _activation_inputs(model_sha: str, records_sha: str, sal_sha: str | None) -> dict[str, str]:
    return {"model": model_sha, "records": records_sha, "saliency": sal_sha or "all-coordinates"}


def shard_key(
    cfg: FinescopeConfig, model_sha: str, records_sha: str, layers: list[int], sal_sha: str | None, start: int, stop: int
) -> StageKey:
    """`activation-shards`: pooled activations of records [start, stop) (all coordinates without saliency)."""
    config = {**_activation_config(cfg, layers), "start": start, "stop": stop}
    return StageKey("activation-shards", "1", config, _activation_inputs(model_sha, records_sha, sal_sha))


def activations_key(
    cfg: FinescopeConfig, model_sha: str, records_sha: str, layers: list[int], sal_sha: str | None
) -> StageKey:
    """`activations`: the list of a record set's shards (the shard size decides how it is split)."""
    config = {**_activation_config(cfg, layers), "shard_size": cfg.curate.shard_size}
    return StageKey("activations", ACTIVATIONS_VERSION, config, _activation_inputs(model_sha, records_sha, sal_sha))


def shard_plan(rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `shard_size` records: one embedding task each."""
    return [(start, min(start + shard_size, rows)) for start in range(0, rows, shard_size)]


@task(name="embed-shard", task_run_name="embed-{records.stage}-{start}", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def activation_shard_task(
    cfg: FinescopeConfig, ref: ModelRef, records: StageManifest, layers: list[int], sal: StageManifest | None,
    start: int, stop: int,
) -> StageManifest:
    """Pooled activations of records [start, stop) at the selected coordinates (all without `sal`).

    Each shard is its own artifact, so shards run on different workers and a killed run keeps the
    shards it finished.
    """
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        indices = LayerSaliency.load(artifact_dir(store, sal)).indices if sal is not None else None
        part = RecordSet(load_data(cfg, records).records[start:stop])
        what = f"activations ({records.stage} {start}:{stop})"
        with _model(cfg, ref) as (model, tok):
            return core.activation_stage(model, tok, part, layers, indices, cfg.curate, work, Progress(what))

    spec = shard_key(cfg, ref.sha256, records.sha256, layers, sal.sha256 if sal else None, start, stop)
    return run_cached(store, spec, build)


def lookup_activations(
    cfg: FinescopeConfig, ref: ModelRef, records: StageManifest, layers: list[int], sal: StageManifest | None
) -> StageManifest | None:
    """The gathered activations of `records` when they and every shard they list are in the store."""
    store = open_store(cfg)
    found = lookup_stage(store, activations_key(cfg, ref.sha256, records.sha256, layers, sal.sha256 if sal else None))
    if found is None:
        return None
    if any(store.lookup(s["stage"], s["key"]) is None for s in listed_shards(store, found)):
        logger().info("activations of %s: a shard was deleted from the store; recomputing it", records.stage)
        return None
    return found


def listed_shards(store: ArtifactStore, acts: StageManifest) -> list[dict[str, Any]]:
    """The shard references of a gathered activations artifact: [{stage, key, sha256, rows}] in row order."""
    return json.loads((artifact_dir(store, acts) / "shards.json").read_text())


@task(name="activations", task_run_name="activations-{records.stage}", cache_policy=RUN_RESULTS, **STORE_RETRIES)
def gather_activations_task(
    cfg: FinescopeConfig, ref: ModelRef, records: StageManifest, layers: list[int], sal: StageManifest | None,
    shards: list[StageManifest], rows: int,
) -> StageManifest:
    """One artifact that lists the shard artifacts of `records` (`rows` records) in row order (references, not copies)."""
    covered = sum(s.info.get("rows", 0) for s in shards)
    if covered != rows:
        raise ValueError(f"activation shards cover {covered} of {rows} records of {records.uri}; re-run")

    def build(work: Path) -> dict[str, Any]:
        listed = [{"stage": s.stage, "key": s.key, "sha256": s.sha256, "rows": s.info.get("rows", 0)} for s in shards]
        (work / "shards.json").write_text(json.dumps(listed, indent=1))
        return {"layers": layers, "rows": rows, "shards": len(shards)}

    spec = activations_key(cfg, ref.sha256, records.sha256, layers, sal.sha256 if sal else None)
    return run_cached(open_store(cfg), spec, build)


def activation_dirs(store: ArtifactStore, acts: StageManifest) -> list[Path]:
    """Local directories of the shards a gathered activations artifact lists, in row order."""
    dirs = []
    for s in listed_shards(store, acts):
        found = store.lookup(s["stage"], s["key"])
        if found is None or found.sha256 != s["sha256"]:
            raise FileNotFoundError(
                f"{store.artifact_uri(s['stage'], s['key'])} (listed by {acts.uri}) is missing or changed; re-run to rebuild it"
            )
        dirs.append(store.local_path(found))
    return dirs


def sae_groups(num_layers: int, per_task: int) -> list[list[int]]:
    """Positions of the hooked layers, `per_task` at a time: one SAE training task each."""
    return [list(range(i, min(i + per_task, num_layers))) for i in range(0, num_layers, per_task)]


def _sae_config(cfg: FinescopeConfig) -> dict[str, Any]:
    return {"sae": cfg.curate.sae.model_dump(), "seed": cfg.seed}


def sae_layers_key(cfg: FinescopeConfig, acts_sha: str, sal_sha: str, layer_ids: list[int]) -> StageKey:
    """`sae-layers`: the SAEs of some hooked layers (by layer id), trained on the corpus activations."""
    return StageKey("sae-layers", "1", {**_sae_config(cfg), "layers": layer_ids}, {"activations": acts_sha, "saliency": sal_sha})


def sae_key(cfg: FinescopeConfig, acts_sha: str, sal_sha: str) -> StageKey:
    """`sae`: every hooked layer's SAE in one artifact."""
    return StageKey("sae", SAE_VERSION, _sae_config(cfg), {"activations": acts_sha, "saliency": sal_sha})


@task(name="sae-layers", task_run_name="sae-layers-{positions}", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def sae_layers_task(
    cfg: FinescopeConfig, acts: StageManifest, sal: StageManifest, layers: list[int], positions: list[int]
) -> StageManifest:
    """Eq. 3-5 / §6: the SAEs of some hooked layers (batched into one module), on their activations only."""
    store = open_store(cfg)
    ids = [layers[i] for i in positions]

    def build(work: Path) -> dict[str, Any]:
        indices = LayerSaliency.load(artifact_dir(store, sal)).indices
        progress = Progress(f"sae training (layers {ids})")
        return core.sae_stage(activation_dirs(store, acts), layers, indices, cfg.curate, cfg.seed, work, progress, positions)

    return run_cached(store, sae_layers_key(cfg, acts.sha256, sal.sha256, ids), build)


def lookup_sae(cfg: FinescopeConfig, acts: StageManifest, sal: StageManifest) -> StageManifest | None:
    return lookup_stage(open_store(cfg), sae_key(cfg, acts.sha256, sal.sha256))


@task(name="sae", cache_policy=RUN_RESULTS, **STORE_RETRIES)
def gather_sae_task(
    cfg: FinescopeConfig, acts: StageManifest, sal: StageManifest, layers: list[int], parts: list[StageManifest]
) -> StageManifest:
    """Every layer's SAE in one artifact (copied: SAEs are small), metrics in layer order."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        metrics: dict[int, Any] = {}
        for part in parts:
            src = artifact_dir(store, part)
            for layer, m in zip(part.info["layers"], part.info["metrics"], strict=True):
                shutil.copytree(src / f"layer_{layer:02d}", work / f"layer_{layer:02d}")
                metrics[layer] = m
        missing = sorted(set(layers) - set(metrics))
        if missing:
            raise ValueError(f"no SAE was trained for layers {missing}; re-run")
        return {"layers": layers, "metrics": [metrics[layer] for layer in layers]}

    return run_cached(store, sae_key(cfg, acts.sha256, sal.sha256), build)


def curated_key(
    cfg: FinescopeConfig, corpus_sha: str, seeds_sha: str, acts_shas: list[str] | None, sae_sha: str | None
) -> StageKey:
    """`curated`: retrieval and vote, on corpus and seeds, their activations and the SAEs (per method)."""
    c = cfg.curate
    config = {"method": c.method, "top_m": c.top_m, "final_size": c.final_size, "seed": cfg.seed}
    inputs = {"corpus": corpus_sha, "seeds": seeds_sha, "activations": "+".join(acts_shas or []), "sae": sae_sha or ""}
    return StageKey("curated", "1", config, inputs)


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
        corpus_emb, seed_emb = _embeddings(cfg, store, seed_records, corpus_records, acts, sae)
        if corpus_emb is not None:
            core.save_embeddings(work / "embeddings.safetensors", corpus_emb, seed_emb)
        excluded = seed_copies(corpus_records, seed_records)
        voted, extra = core.select_records(
            cfg.curate.method, corpus_emb, seed_emb, len(corpus_records), cfg.curate, cfg.seed, excluded
        )
        rows = core.curated_rows(corpus_records, voted)
        summary = {"method": cfg.curate.method, "corpus_records": len(corpus_records), "seed_records": len(seed_records), **extra}
        return core.write_curated(rows, work, summary)

    acts_shas = [a.sha256 for a in acts] if acts else None
    return run_cached(store, curated_key(cfg, corpus.sha256, seeds.sha256, acts_shas, sae.sha256 if sae else None), build)


def _embeddings(cfg, store, seeds: RecordSet, corpus: RecordSet, acts, sae):
    method = cfg.curate.method
    if method == "random":
        return None, None
    if method == "sentence":
        progress = Progress("sentence embeddings")
        device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        corpus_emb = sentence_embeddings(corpus.texts, device=device, progress=progress)
        return {-1: corpus_emb}, {-1: sentence_embeddings(seeds.texts, device=device)}
    corpus_dir, seed_dir = activation_dirs(store, acts[0]), activation_dirs(store, acts[1])
    if method == "activation":
        return core.raw_activation_embeddings(corpus_dir, seed_dir, acts[0].info["layers"])
    logger().info("encoding corpus and seeds with the SAEs")
    return core.sae_codes(corpus_dir, seed_dir, artifact_dir(store, sae))

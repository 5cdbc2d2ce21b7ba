"""The fanned-out curation stages: corpus shards, per-layer SAEs and per-shard SAE codes as mapped tasks.

Each runs as a subflow on the task runner chosen by `orchestration.task_runner` (threads, Dask or
Ray), so the rest of a run stays in its own process while these spread over workers. The parent
looks in the store first: a cached stage starts no subflow and no cluster.
"""

from __future__ import annotations

from prefect import flow, unmapped

from finescope_core.config import FinescopeConfig
from flows.runtime import gpu_placement, task_runner
from flows.ui import detached
from tasks.activations import (
    activation_shard_task,
    gather_activations_task,
    lookup_activations,
    shard_plan,
)
from tasks.caching import StageManifest
from tasks.codes import codes_task, corpus_shard_refs, lookup_codes
from tasks.data import record_count
from tasks.models import ModelRef
from tasks.sae import gather_sae_task, lookup_sae, sae_groups, sae_layers_task


@flow(name="embed", log_prints=True)
def embed_flow(
    config: FinescopeConfig,
    ref: ModelRef,
    record_sets: list[StageManifest],
    layers: list[int],
    sal: StageManifest | None,
) -> list[StageManifest]:
    """Every shard of every record set as one mapped task, then one gathered artifact per record set."""
    sizes = [record_count(config, records) for records in record_sets]
    plans = [shard_plan(size, config.curate.shard_size) for size in sizes]
    with gpu_placement(config):
        futures = [
            activation_shard_task.map(
                unmapped(config),
                unmapped(ref),
                unmapped(records),
                unmapped(layers),
                unmapped(sal),
                [start for start, _ in plan],
                [stop for _, stop in plan],
            )
            for records, plan in zip(record_sets, plans, strict=True)
        ]
    shards = [f.result() for f in futures]
    return [
        gather_activations_task(config, ref, records, layers, sal, done, size)
        for records, done, size in zip(record_sets, shards, sizes, strict=True)
    ]


def embed(
    config: FinescopeConfig,
    ref: ModelRef,
    record_sets: list[StageManifest],
    layers: list[int],
    sal: StageManifest | None,
) -> list[StageManifest]:
    """Activations of each record set: from the store when cached, else through `embed_flow`.

    Record sets with the same content (the same artifact hash, e.g. a `curate.sae_corpus` that is the
    corpus) have the same activations key: each is embedded once.
    """
    found = [lookup_activations(config, ref, records, layers, sal) for records in record_sets]
    missing = list(
        {
            records.sha256: records for records, hit in zip(record_sets, found, strict=True) if hit is None
        }.values()
    )
    if missing:
        runner = embed_flow.with_options(
            task_runner=task_runner(config), flow_run_name="embed-" + "+".join(m.stage for m in missing)
        )
        made = detached(runner(config, ref, missing, layers, sal))
        built = dict(zip((m.sha256 for m in missing), made, strict=True))
        found = [
            hit if hit is not None else built[records.sha256]
            for records, hit in zip(record_sets, found, strict=True)
        ]
    return found  # type: ignore[return-value]


@flow(name="sae-training", flow_run_name="sae-training", log_prints=True)
def sae_flow(
    config: FinescopeConfig,
    acts: StageManifest,
    sal: StageManifest,
    layers: list[int],
    records: StageManifest,
) -> StageManifest:
    """One mapped task per group of `orchestration.sae_layers_per_task` layers, then one SAE artifact."""
    groups = sae_groups(len(layers), config.orchestration.sae_layers_per_task)
    with gpu_placement(config):
        futures = sae_layers_task.map(
            unmapped(config), unmapped(acts), unmapped(sal), unmapped(layers), groups
        )
    return gather_sae_task(config, acts, sal, layers, futures.result(), records)


def train_saes(
    config: FinescopeConfig,
    acts: StageManifest,
    sal: StageManifest,
    layers: list[int],
    records: StageManifest,
) -> StageManifest:
    """The SAEs of every hooked layer, trained on `acts` (the activations of `records`: the corpus, or
    `curate.sae_corpus`): from the store when cached, else through `sae_flow`."""
    found = lookup_sae(config, acts, sal)
    if found is not None:
        return found
    runner = sae_flow.with_options(task_runner=task_runner(config))
    return detached(runner(config, acts, sal, layers, records))


@flow(name="sae-codes", flow_run_name="sae-codes", log_prints=True)
def codes_flow(
    config: FinescopeConfig, acts: StageManifest, sae: StageManifest, missing: list[int]
) -> list[StageManifest]:
    """One mapped task per corpus shard whose codes are not in the store yet."""
    shards = corpus_shard_refs(config, acts)
    with gpu_placement(config):
        futures = codes_task.map(unmapped(config), [shards[i] for i in missing], unmapped(sae), missing)
    return list(futures.result())


def encode_corpus(config: FinescopeConfig, acts: StageManifest, sae: StageManifest) -> list[StageManifest]:
    """The sparse SAE codes of every corpus shard, in row order: from the store when cached, else through `codes_flow`."""
    found = lookup_codes(config, acts, sae)
    missing = [i for i, hit in enumerate(found) if hit is None]
    if missing:
        runner = codes_flow.with_options(task_runner=task_runner(config))
        built = iter(detached(runner(config, acts, sae, missing)))
        found = [hit if hit is not None else next(built) for hit in found]
    return found  # type: ignore[return-value]

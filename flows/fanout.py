"""The fanned-out curation stages: corpus shards, per-layer SAEs and per-shard SAE codes as mapped tasks.

Each runs as a subflow on the task runner chosen by `orchestration.task_runner` (threads, Dask or
Ray), so the rest of a run stays in its own process while these spread over workers. The parent
looks in the store first: a cached stage starts no subflow and no cluster. In a dry run
(`tasks.planning`) each plans its gathered stage with its parts instead of starting the subflow.
"""

from __future__ import annotations

from prefect import flow, unmapped

from finescope_core.config import FinescopeConfig
from flows.runtime import gpu_placement, task_runner
from flows.ui import detached
from tasks.activations import (
    activation_shard_task,
    activations_key,
    gather_activations_task,
    listed_shards,
    lookup_activations,
    shard_key,
    shard_plan,
)
from tasks.caching import StageManifest, lookup_stage, planned_after, planned_row
from tasks.codes import codes_key, codes_task, corpus_shard_refs, lookup_codes
from tasks.context import RunContext
from tasks.data import record_count
from tasks.models import ModelRef
from tasks.planning import Planner, current_planner
from tasks.sae import gather_sae_task, lookup_sae, sae_groups, sae_key, sae_layers_key, sae_layers_task


@flow(name="embed", log_prints=True)
def embed_flow(
    config: FinescopeConfig,
    ctx: RunContext,
    ref: ModelRef,
    record_sets: list[StageManifest],
    layers: list[int],
    sal: StageManifest | None,
) -> list[StageManifest]:
    """Every shard of every record set as one mapped task, then one gathered artifact per record set."""
    sizes = [record_count(ctx, records) for records in record_sets]
    plans = [shard_plan(size, config.curate.shard_size) for size in sizes]
    with gpu_placement(config):
        futures = [
            activation_shard_task.map(
                unmapped(config.curate),
                unmapped(ctx),
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
        gather_activations_task(config.curate, ctx, ref, records, layers, sal, done, size)
        for records, done, size in zip(record_sets, shards, sizes, strict=True)
    ]


def embed(
    config: FinescopeConfig,
    ctx: RunContext,
    ref: ModelRef,
    record_sets: list[StageManifest],
    layers: list[int],
    sal: StageManifest | None,
) -> list[StageManifest]:
    """Activations of each record set: from the store when cached, else through `embed_flow`.

    Record sets with the same content (the same artifact hash, e.g. a `curate.sae_corpus` that is the
    corpus) have the same activations key: each is embedded once.
    """
    planner = current_planner()
    if planner is not None:
        return [_plan_activations(planner, config, ctx, ref, records, layers, sal) for records in record_sets]
    found = [lookup_activations(config.curate, ctx, ref, records, layers, sal) for records in record_sets]
    missing = list(
        {
            records.sha256: records for records, hit in zip(record_sets, found, strict=True) if hit is None
        }.values()
    )
    if missing:
        runner = embed_flow.with_options(
            task_runner=task_runner(config), flow_run_name="embed-" + "+".join(m.stage for m in missing)
        )
        made = detached(runner(config, ctx, ref, missing, layers, sal))
        built = dict(zip((m.sha256 for m in missing), made, strict=True))
        found = [
            hit if hit is not None else built[records.sha256]
            for records, hit in zip(record_sets, found, strict=True)
        ]
    return found  # type: ignore[return-value]


@flow(name="sae-training", flow_run_name="sae-training", log_prints=True)
def sae_flow(
    config: FinescopeConfig,
    ctx: RunContext,
    acts: StageManifest,
    sal: StageManifest,
    layers: list[int],
    records: StageManifest,
) -> StageManifest:
    """One mapped task per group of `orchestration.sae_layers_per_task` layers, then one SAE artifact."""
    groups = sae_groups(len(layers), config.orchestration.sae_layers_per_task)
    with gpu_placement(config):
        futures = sae_layers_task.map(
            unmapped(config.curate), unmapped(ctx), unmapped(acts), unmapped(sal), unmapped(layers), groups
        )
    return gather_sae_task(config.curate, ctx, acts, sal, layers, futures.result(), records)


def train_saes(
    config: FinescopeConfig,
    ctx: RunContext,
    acts: StageManifest,
    sal: StageManifest,
    layers: list[int],
    records: StageManifest,
) -> StageManifest:
    """The SAEs of every hooked layer, trained on `acts` (the activations of `records`: the corpus, or
    `curate.sae_corpus`): from the store when cached, else through `sae_flow`."""
    planner = current_planner()
    if planner is not None:
        return _plan_sae(planner, config, ctx, acts, sal, layers)
    found = lookup_sae(config.curate, ctx, acts, sal)
    if found is not None:
        return found
    runner = sae_flow.with_options(task_runner=task_runner(config))
    return detached(runner(config, ctx, acts, sal, layers, records))


@flow(name="sae-codes", flow_run_name="sae-codes", log_prints=True)
def codes_flow(
    config: FinescopeConfig, ctx: RunContext, acts: StageManifest, sae: StageManifest, missing: list[int]
) -> list[StageManifest]:
    """One mapped task per corpus shard whose codes are not in the store yet."""
    shards = corpus_shard_refs(ctx, acts)
    with gpu_placement(config):
        futures = codes_task.map(
            unmapped(config.curate), unmapped(ctx), [shards[i] for i in missing], unmapped(sae), missing
        )
    return list(futures.result())


def encode_corpus(
    config: FinescopeConfig, ctx: RunContext, acts: StageManifest, sae: StageManifest
) -> list[StageManifest]:
    """The sparse SAE codes of every corpus shard, in row order: from the store when cached, else through
    `codes_flow`."""
    planner = current_planner()
    if planner is not None:
        return _plan_codes(planner, config, ctx, acts, sae)
    found = lookup_codes(config.curate, ctx, acts, sae)
    missing = [i for i, hit in enumerate(found) if hit is None]
    if missing:
        runner = codes_flow.with_options(task_runner=task_runner(config))
        built = iter(detached(runner(config, ctx, acts, sae, missing)))
        found = [hit if hit is not None else next(built) for hit in found]
    return found  # type: ignore[return-value]


# --- dry runs: each fanned-out stage planned with its parts ------------------------------------------


def _plan_activations(
    planner: Planner,
    config: FinescopeConfig,
    ctx: RunContext,
    ref: ModelRef,
    records: StageManifest,
    layers: list[int],
    sal: StageManifest | None,
) -> StageManifest:
    """Gathered activations are reused only with every shard they list (`lookup_activations`)."""
    name = f"activations ({records.stage})"
    waiting = planned_after("activations", ref, records, sal, name=name)
    if waiting is not None:
        return waiting
    section, sal_sha = config.curate, sal.sha256 if sal else None
    found = lookup_activations(section, ctx, ref, records, layers, sal)
    if found is not None:
        for s in listed_shards(ctx.store, found):
            planner.part(s["stage"], s["key"], True)
    else:
        for start, stop in shard_plan(record_count(ctx, records), section.shard_size):
            spec = shard_key(section, ctx, ref.sha256, records.sha256, layers, sal_sha, start, stop)
            planner.part(spec.stage, spec.key, lookup_stage(ctx.store, spec) is not None)
    spec = activations_key(section, ctx, ref.sha256, records.sha256, layers, sal_sha)
    return planned_row(planner, name, "activations", spec, found)


def _plan_sae(
    planner: Planner,
    config: FinescopeConfig,
    ctx: RunContext,
    acts: StageManifest,
    sal: StageManifest,
    layers: list[int],
) -> StageManifest:
    waiting = planned_after("sae", acts, sal, name="sae")
    if waiting is not None:
        return waiting
    section = config.curate
    for group in sae_groups(len(layers), config.orchestration.sae_layers_per_task):
        spec = sae_layers_key(section, ctx, acts.sha256, sal.sha256, [layers[i] for i in group])
        planner.part(spec.stage, spec.key, lookup_stage(ctx.store, spec) is not None)
    found = lookup_sae(section, ctx, acts, sal)
    return planned_row(planner, "sae", "sae", sae_key(section, ctx, acts.sha256, sal.sha256), found)


def _plan_codes(
    planner: Planner, config: FinescopeConfig, ctx: RunContext, acts: StageManifest, sae: StageManifest
) -> list[StageManifest]:
    """The corpus's codes, one artifact per activation shard (no gathered artifact: the row has no key)."""
    waiting = planned_after("sae-codes", acts, sae, name="sae-codes")
    if waiting is not None:
        return [waiting]
    specs = [codes_key(config.curate, ctx, s["sha256"], sae.sha256) for s in corpus_shard_refs(ctx, acts)]
    found = [lookup_stage(ctx.store, spec) for spec in specs]
    for spec, hit in zip(specs, found, strict=True):
        planner.part(spec.stage, spec.key, hit is not None)
    if all(hit is not None for hit in found):
        planner.row("sae-codes", "sae-codes", "reuse")
        return [hit for hit in found if hit is not None]
    return [planned_row(planner, "sae-codes", "sae-codes", None, None)]

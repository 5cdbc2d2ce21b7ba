"""Tasks of the `activations` stage: pooled activations per corpus shard, gathered by reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finescope_core.config import CurateConfig
from finescope_core.curate import activations as stage
from finescope_core.curate.activations import MANIFEST_FILE, ActivationInputs
from finescope_core.store import ArtifactStore
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, lookup_stage, run_cached
from tasks.context import RunContext, logger
from tasks.data import load_rows
from tasks.identity import Precision, shared_precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, using_model
from tasks.progress import Progress
from tasks.registry import Stage, stage_task
from tasks.retries import GPU_TAGS, STORE_RETRIES


class ShardKey(ModelStageKey):
    """`activation-shards`: pooled activations of records [start, stop) at the saliency-selected coordinates
    (all coordinates without saliency), on the model, the record set and the saliency artifact.

    The batch size is not in it: padding is masked out of attention and pooling, so it changes nothing
    beyond float rounding.
    """

    STAGE = "activation-shards"
    VERSION = "1"
    CONFIG = {"max_length": "curate.max_length", "skip_first": "curate.skip_first"}
    DERIVED = ("curate.layers", "curate.num_layers", "curate.shard_size", "device", "model_dtype")
    CODE = ("finescope_core.curate", "finescope_core.activations")

    layers: list[int]
    max_length: int
    skip_first: int
    start: int
    stop: int


class ActivationsKey(ModelStageKey):
    """`activations`: the list of a record set's shards (the shard size decides how it is split)."""

    STAGE = "activations"
    VERSION = "2"  # 2: the fanned-out layout, shards listed by reference
    CONFIG = {
        "max_length": "curate.max_length",
        "skip_first": "curate.skip_first",
        "shard_size": "curate.shard_size",
    }
    DERIVED = ("curate.layers", "curate.num_layers", "device", "model_dtype")
    CODE = ("finescope_core.curate", "finescope_core.activations")

    layers: list[int]
    max_length: int
    skip_first: int
    shard_size: int


def _activation_inputs(model_sha: str, records_sha: str, sal_sha: str | None) -> dict[str, str]:
    return {"model": model_sha, "records": records_sha, "saliency": sal_sha or "all-coordinates"}


def shard_key(
    section: CurateConfig,
    ctx: RunContext,
    model_sha: str,
    records_sha: str,
    layers: list[int],
    sal_sha: str | None,
    start: int,
    stop: int,
    precision: Precision | None = None,
) -> StageKey:
    """`precision`: where the shard's work runs (`work_precision`, resolved by the caller when None)."""
    inputs = _activation_inputs(model_sha, records_sha, sal_sha)
    return ShardKey.of(
        ctx.settings(curate=section), inputs, precision, layers=layers, start=start, stop=stop
    ).spec()


def activations_key(
    section: CurateConfig,
    ctx: RunContext,
    model_sha: str,
    records_sha: str,
    layers: list[int],
    sal_sha: str | None,
    precision: Precision | None = None,
) -> StageKey:
    """`precision`: the one its shards ran in (the gather passes theirs; a lookup, this process's)."""
    inputs = _activation_inputs(model_sha, records_sha, sal_sha)
    return ActivationsKey.of(ctx.settings(curate=section), inputs, precision, layers=layers).spec()


def shard_plan(rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `shard_size` records: one embedding task each."""
    return [(start, min(start + shard_size, rows)) for start in range(0, rows, shard_size)]


SHARDS_FILE = "shards.json"
"""The gathered `activations` artifact's one file: its shards' references, in row order."""
SHARD = Stage(
    "activation-shards",
    ShardKey,
    upstream=("models", "corpus", "seeds", "sae-corpus", "saliency"),
    core=stage.run,
    files=(MANIFEST_FILE,),
    part_of="activations",
)
ACTIVATIONS = Stage("activations", ActivationsKey, upstream=("activation-shards",), files=(SHARDS_FILE,))


@stage_task(
    SHARD,
    label="activations ({records.stage})",
    task_run_name="activation-shards-{records.stage}-{start}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **STORE_RETRIES,
)
def activation_shard_task(
    section: CurateConfig,
    ctx: RunContext,
    ref: ModelRef,
    records: StageManifest,
    layers: list[int],
    sal: StageManifest | None,
    start: int,
    stop: int,
) -> StageManifest:
    """Pooled activations of records [start, stop) at the selected coordinates (all without `sal`).

    Each shard is its own artifact, so shards run on different workers and a killed run keeps the
    shards it finished.
    """
    store = ctx.store
    ran = ctx.precision()  # here, on the worker that runs the model: the key says what it ran in

    def build(work: Path) -> dict[str, Any]:
        part = load_rows(ctx, records, start, stop)
        what = f"activations ({records.stage} {start}:{stop})"
        sal_dir = artifact_dir(store, sal) if sal is not None else None
        with using_model(ref.path, ran.device, ran.dtype) as (model, tok):
            inputs = ActivationInputs(
                model=model, tokenizer=tok, records=part, layers=layers, saliency_dir=sal_dir
            )
            return stage.run(inputs, section, ctx.stage_context(ran), work, Progress(what))

    spec = shard_key(
        section, ctx, ref.sha256, records.sha256, layers, sal.sha256 if sal else None, start, stop, ran
    )
    return run_cached(store, spec, build)


def lookup_activations(
    section: CurateConfig,
    ctx: RunContext,
    ref: ModelRef,
    records: StageManifest,
    layers: list[int],
    sal: StageManifest | None,
) -> StageManifest | None:
    """The gathered activations of `records` when they and every shard they list are in the store."""
    store = ctx.store
    found = lookup_stage(
        store, activations_key(section, ctx, ref.sha256, records.sha256, layers, sal.sha256 if sal else None)
    )
    if found is None:
        return None
    shards = [store.lookup(s["stage"], s["key"]) for s in listed_shards(store, found)]
    if any(shard is None or store.verify(shard) for shard in shards):  # its run_cached says what is wrong
        logger().info(
            "activations of %s: a shard was deleted from the store or damaged; recomputing it", records.stage
        )
        return None
    return found


def listed_shards(store: ArtifactStore, acts: StageManifest) -> list[dict[str, Any]]:
    """The shard references of a gathered activations artifact: [{stage, key, sha256, rows}] in row order."""
    shards: list[dict[str, Any]] = json.loads((artifact_dir(store, acts) / SHARDS_FILE).read_text())
    return shards


@stage_task(
    ACTIVATIONS,
    label="activations ({records.stage})",
    task_run_name="activations-{records.stage}",
    cache_policy=RUN_RESULTS,
    **STORE_RETRIES,
)
def gather_activations_task(
    section: CurateConfig,
    ctx: RunContext,
    ref: ModelRef,
    records: StageManifest,
    layers: list[int],
    sal: StageManifest | None,
    shards: list[StageManifest],
    rows: int,
) -> StageManifest:
    """One artifact that lists the shard artifacts of `records` (`rows` records) in row order (references,
    not copies)."""
    covered = sum(s.info.get("rows", 0) for s in shards)
    if covered != rows:
        raise ValueError(f"activation shards cover {covered} of {rows} records of {records.uri}; re-run")

    def build(work: Path) -> dict[str, Any]:
        listed = [
            {"stage": s.stage, "key": s.key, "sha256": s.sha256, "rows": s.info.get("rows", 0)}
            for s in shards
        ]
        (work / SHARDS_FILE).write_text(json.dumps(listed, indent=1))
        # The work is the shards' (this step only lists them): their seconds make the stage's time.
        return {
            "layers": layers,
            "rows": rows,
            "shards": len(shards),
            "parts_seconds": sum(s.seconds for s in shards),
        }

    # The shards ran on the workers: their precision, not this process's, is what the artifact holds.
    ran = shared_precision([s.info for s in shards], f"activations of {records.uri}")
    spec = activations_key(section, ctx, ref.sha256, records.sha256, layers, sal.sha256 if sal else None, ran)
    return run_cached(ctx.store, spec, build)


def activation_dirs(store: ArtifactStore, acts: StageManifest) -> list[Path]:
    """Local directories of the shards a gathered activations artifact lists, in row order."""
    dirs = []
    for s in listed_shards(store, acts):
        found = store.lookup(s["stage"], s["key"])
        if found is None or found.sha256 != s["sha256"]:
            raise FileNotFoundError(
                f"{store.artifact_uri(s['stage'], s['key'])} (listed by {acts.uri}) is missing or changed; "
                f"re-run to rebuild it"
            )
        dirs.append(store.local_path(found))
    return dirs

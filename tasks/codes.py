"""Tasks of the `sae-codes` stage: the corpus's sparse SAE codes, one artifact per corpus shard.

Each corpus activation shard is encoded by its own task (fanned out like the embedding), keyed by that
shard's artifact and the SAEs, so a new seed set reuses every code and a killed run keeps the shards it
finished. Retrieval streams them (`retrieval.stream`); nothing dense over the whole corpus is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finescope_core.config import CurateConfig
from finescope_core.model import pick_device
from finescope_core.sae import codes as stage
from finescope_core.sae.codes import CODES_FILE, CodesInputs
from finescope_core.stage import StageContext
from tasks.activations import listed_shards
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, lookup_stage, run_cached
from tasks.context import RunContext
from tasks.keymodels import StageKey, StageKeyModel
from tasks.progress import Progress
from tasks.registry import Stage, stage_task
from tasks.retries import GPU_TAGS, STORE_RETRIES


class CodesKey(StageKeyModel):
    """`sae-codes`: one corpus shard's SAE codes (every nonzero latent, or the largest `code_k`), on that
    shard's activations and the SAEs."""

    STAGE = "sae-codes"
    VERSION = "1"
    CODE = ("finescope_core.sae", "finescope_core.sae.codes")
    CONFIG = {"code_k": "curate.code_k", "code_dtype": "curate.code_dtype"}

    code_k: int | str
    code_dtype: str


def codes_key(section: CurateConfig, ctx: RunContext, shard_sha: str, sae_sha: str) -> StageKey:
    return CodesKey.of(ctx.settings(curate=section), {"activations": shard_sha, "sae": sae_sha}).spec()


def corpus_shard_refs(ctx: RunContext, acts: StageManifest) -> list[dict[str, Any]]:
    """The shard references ({stage, key, sha256, rows}) of a gathered activations artifact, in row order."""
    return listed_shards(ctx.store, acts)


CODES = Stage(
    "sae-codes", CodesKey, upstream=("activation-shards", "sae"), core=stage.run, files=(CODES_FILE,)
)


@stage_task(
    CODES,
    task_run_name="sae-codes-{index}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **STORE_RETRIES,
)
def codes_task(
    section: CurateConfig, ctx: RunContext, shard: dict[str, Any], sae: StageManifest, index: int
) -> StageManifest:
    """The sparse codes of one corpus shard (the `index`-th) under every layer's SAE."""
    store = ctx.store

    def build(work: Path) -> dict[str, Any]:
        found = store.lookup(shard["stage"], shard["key"])
        if found is None or found.sha256 != shard["sha256"]:
            raise FileNotFoundError(
                f"{store.artifact_uri(shard['stage'], shard['key'])} is missing or changed; "
                "re-run to rebuild it"
            )
        inputs = CodesInputs(shard_dir=store.local_path(found), sae_dir=artifact_dir(store, sae))
        # Encoding runs where the SAEs are (`pick_device`: `auto` resolved here); codes come back to the CPU.
        ran = StageContext(device=str(pick_device(ctx.device)), dtype="float32", seed=ctx.seed)
        return stage.run(inputs, section, ran, work, Progress(f"sae codes (shard {index})"))

    return run_cached(store, codes_key(section, ctx, shard["sha256"], sae.sha256), build)


def lookup_codes(
    section: CurateConfig, ctx: RunContext, acts: StageManifest, sae: StageManifest
) -> list[StageManifest | None]:
    """Per corpus shard, its codes when they are in the store (None where not)."""
    store = ctx.store
    return [
        lookup_stage(store, codes_key(section, ctx, s["sha256"], sae.sha256))
        for s in corpus_shard_refs(ctx, acts)
    ]


def code_dirs(ctx: RunContext, codes: list[StageManifest]) -> list[Path]:
    """Local directories of the code artifacts, in row order."""
    store = ctx.store
    return [artifact_dir(store, c) for c in codes]

"""Tasks of the `sae` stage: one SAE per hooked layer, trained in groups of layers, gathered into one
artifact."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finescope_core.config import CurateConfig
from finescope_core.curate import sae as stage
from finescope_core.curate.sae import SaeLayersInputs
from finescope_core.model import pick_device
from finescope_core.stage import StageContext
from tasks.activations import activation_dirs
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, lookup_stage, run_cached
from tasks.context import RunContext
from tasks.keymodels import StageKey, StageKeyModel
from tasks.progress import Progress
from tasks.registry import Stage, stage_task
from tasks.retries import GPU_TAGS, STORE_RETRIES


def sae_groups(num_layers: int, per_task: int) -> list[list[int]]:
    """Positions of the hooked layers, `per_task` at a time: one SAE training task each."""
    return [list(range(i, min(i + per_task, num_layers))) for i in range(0, num_layers, per_task)]


class SaeLayersKey(StageKeyModel):
    """`sae-layers`: the SAEs of some hooked layers (by layer id), trained on the corpus activations."""

    STAGE = "sae-layers"
    VERSION = "2"  # 2: held-out split, early stopping, TopK
    CODE = ("finescope_core.curate", "finescope_core.sae")
    CONFIG = {"sae": "curate.sae", "seed": "seed"}
    DERIVED = ("curate.layers", "curate.num_layers", "orchestration.sae_layers_per_task")

    sae: dict[str, Any]
    seed: int
    layers: list[int]


class SaeKey(StageKeyModel):
    """`sae`: every hooked layer's SAE in one artifact (the hooked layers come with the activations).

    Keyed by the activations it trains on (the corpus's, or `curate.sae_corpus`'s) and the saliency,
    never by the corpus being curated as such.
    """

    STAGE = "sae"
    VERSION = "3"  # 2: gathered from per-layer-group artifacts; 3: held-out split, early stopping, TopK
    CODE = ("finescope_core.curate", "finescope_core.sae")
    CONFIG = {"sae": "curate.sae", "seed": "seed"}

    sae: dict[str, Any]
    seed: int


def sae_layers_key(
    section: CurateConfig, ctx: RunContext, acts_sha: str, sal_sha: str, layer_ids: list[int]
) -> StageKey:
    return SaeLayersKey.of(
        ctx.settings(curate=section), {"activations": acts_sha, "saliency": sal_sha}, layers=layer_ids
    ).spec()


def sae_key(section: CurateConfig, ctx: RunContext, acts_sha: str, sal_sha: str) -> StageKey:
    return SaeKey.of(ctx.settings(curate=section), {"activations": acts_sha, "saliency": sal_sha}).spec()


SAE_LAYERS = Stage(
    "sae-layers", SaeLayersKey, upstream=("activations", "saliency"), core=stage.run, part_of="sae"
)
SAE = Stage("sae", SaeKey, upstream=("sae-layers",))


@stage_task(
    SAE_LAYERS,
    task_run_name="sae-layers-{positions}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **STORE_RETRIES,
)
def sae_layers_task(
    section: CurateConfig,
    ctx: RunContext,
    acts: StageManifest,
    sal: StageManifest,
    layers: list[int],
    positions: list[int],
) -> StageManifest:
    """Eq. 3-5 / §6: the SAEs of some hooked layers (batched into one module), on their activations only."""
    store = ctx.store
    ids = [layers[i] for i in positions]

    def build(work: Path) -> dict[str, Any]:
        inputs = SaeLayersInputs(
            activation_dirs=activation_dirs(store, acts),
            saliency_dir=artifact_dir(store, sal),
            layers=layers,
            positions=positions,
        )
        # On the run's device (`pick_device`: `auto` resolved here, where the training runs).
        ran = StageContext(device=str(pick_device(ctx.device)), dtype="float32", seed=ctx.seed)
        return stage.run(inputs, section, ran, work, Progress(f"sae training (layers {ids})"))

    return run_cached(store, sae_layers_key(section, ctx, acts.sha256, sal.sha256, ids), build)


def lookup_sae(
    section: CurateConfig, ctx: RunContext, acts: StageManifest, sal: StageManifest
) -> StageManifest | None:
    return lookup_stage(ctx.store, sae_key(section, ctx, acts.sha256, sal.sha256))


def trained_on(records: StageManifest) -> dict[str, Any]:
    """What the SAE stage info says of the records its activations are of: stage (`corpus`, or `sae-corpus`
    for `curate.sae_corpus`), artifact hash and record count."""
    return {"stage": records.stage, "sha256": records.sha256, "records": records.info.get("records")}


@stage_task(SAE, cache_policy=RUN_RESULTS, **STORE_RETRIES)
def gather_sae_task(
    section: CurateConfig,
    ctx: RunContext,
    acts: StageManifest,
    sal: StageManifest,
    layers: list[int],
    parts: list[StageManifest],
    records: StageManifest,
) -> StageManifest:
    """Every layer's SAE in one artifact (copied: SAEs are small), metrics in layer order.

    `records` are the records `acts` are of (the corpus, or `curate.sae_corpus`); the info names them
    (`trained_on`). They are not in the key: the activations' hash already is, and it hashes them.
    """
    store = ctx.store

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
        # The training is the parts' work (this step copies them): their seconds make the stage's time.
        return {
            "layers": layers,
            "metrics": [metrics[layer] for layer in layers],
            "trained_on": trained_on(records),
            "parts_seconds": sum(p.seconds for p in parts),
        }

    return run_cached(store, sae_key(section, ctx, acts.sha256, sal.sha256), build)

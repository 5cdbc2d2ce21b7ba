"""The `prune` flow: curate (cached when done), then structured pruning guided by the curated data."""

from __future__ import annotations

import time
from typing import Any

import torch
from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel
from transformers import AutoModelForCausalLM

from finescope_core.config import ConfigError, FinescopeConfig
from finescope_core.memplan import check_memory
from finescope_core.model import model_config
from finescope_core.prune import plan_widths
from finescope_core.settings import summary
from flows.curate import CurateResult, curate_stages
from flows.placement import place
from flows.runtime import prefect_results
from flows.ui import namer, tagged
from tasks.caching import StageManifest
from tasks.context import RunContext, artifact_key, logger
from tasks.data import model_task
from tasks.export import (
    Exported,
    RunRecord,
    curated_outputs,
    export_task,
    pruned_output,
    run_facts,
)
from tasks.prune import prune_task, pruning_texts


class PruneResult(BaseModel):
    """The curation the pruning used (if any) and the pruned model's artifact."""

    curate: CurateResult | None
    pruned: StageManifest
    exported: Exported | None = None

    def manifests(self) -> dict[str, Any]:
        """Every stage's manifest by name, for run.json."""
        return {**(self.curate.manifests() if self.curate else {}), "pruned": self.pruned.model_dump()}


def check_ratio(cfg: FinescopeConfig) -> None:
    """Refuse an unreachable prune.ratio before any work, on a weightless (meta) copy of the model.

    A ratio of 0 is refused too (the library accepts it, as the identity): the flow would export the
    unpruned model as `pruned-model/`, tuned and reported as if it were pruned.
    """
    if cfg.prune.ratio == 0:
        raise ConfigError(
            "prune.ratio: 0 prunes nothing, so `pruned-model/` would be the unpruned base model "
            "under a misleading name; give a ratio in (0, 1), e.g. 0.3"
        )
    hf = model_config(cfg.model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf)  # type: ignore[no-untyped-call]
    plan_widths(skeleton, cfg.prune.ratio, cfg.prune.attention)


@flow(name="prune", flow_run_name=namer("prune"), log_prints=True)
def prune_flow(config: FinescopeConfig, export: bool = True) -> PruneResult:
    """Curated data (or random / a file, per `prune.data`) decides which heads and channels survive.

    With `export`, the pruned model (with its model card) and the curated set go to the run's output
    location, with run.json.
    """
    start = time.perf_counter()
    check_ratio(config)
    if export:
        config = place(config, "prune")  # another run's outputs are never replaced in silence
    # A stage whose predicted peak is above the memory budget: refused before any model load.
    check_memory(config, stages=("saliency", "activations", "pruned"))
    with prefect_results(config), tagged(config):
        ctx = RunContext.of(config)
        result = prune_graph(config, ctx)
        _publish(config, result.pruned)
        if export:
            curated = result.curate.curated if result.curate else None
            facts = run_facts(config, curated, result.pruned.info)
            outputs = [pruned_output(config, result.pruned, facts)]
            if curated is not None:
                outputs += curated_outputs(config, curated, facts, prefix="curated/")
            result.exported = export_task(
                ctx, RunRecord.of(config), "prune", outputs, result.manifests(), time.perf_counter() - start
            )
    return result


def prune_graph(config: FinescopeConfig, ctx: RunContext) -> PruneResult:
    """The prune pipeline's stages, as a run executes them and `store plan` plans them: curation only
    when the pruning data comes from it."""
    uses_corpus = config.prune.data in ("curated", "random")
    curated = curate_stages(config, ctx) if uses_corpus else None
    texts = pruning_texts(
        config.prune,
        ctx,
        curated.corpus if curated else None,
        curated.curated if curated else None,
        seeds=curated.seeds if curated else None,
        excluded=curated.held_out.excluded if curated else (),
    )
    pruned = prune_task(config.prune, ctx, model_task(ctx, ctx.model), texts)
    return PruneResult(curate=curated, pruned=pruned)


def _publish(config: FinescopeConfig, pruned: StageManifest) -> None:
    """The parameters table as a Prefect artifact, and a log line."""
    info = pruned.info
    rows = [
        {
            "module": k,
            "before": v,
            "after": info["params_after"].get(k, 0),
            "removed": v - info["params_after"].get(k, 0),
        }
        for k, v in info["params_before"].items()
    ]
    create_table_artifact(
        rows,
        key=artifact_key("prune", config, "parameters"),
        description=f"achieved ratio {info['achieved_ratio']:.4f}: {summary(config)}",
    )
    logger().info(
        "pruned %d -> %d parameters (ratio %.4f, target %.2f)",
        info["params_before"]["total"],
        info["params_after"]["total"],
        info["achieved_ratio"],
        config.prune.ratio,
    )

"""The export step every flow ends with: its outputs, with model/dataset cards and run.json, in one place.

A run started from the CLI and one started by a deployment produce the same outputs, because the
flow, not the CLI, writes them: to `config.output`, or `<store>/outputs/<name>` when it is unset.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from finescope_core import __version__
from finescope_core.cards import RunFacts, base_model_id, dataset_card, model_card
from finescope_core.config import FinescopeConfig, slug
from finescope_core.distilled import read_distilled
from finescope_core.export import Output, export_outputs, output_uri
from finescope_core.model import DEFAULT_MODEL
from finescope_core.settings import summary
from finescope_core.store_admin import OUTPUTS_DIR
from tasks.caching import StageManifest, artifact_dir, code_version
from tasks.context import RunContext, logger, run_name
from tasks.identity import model_identity
from tasks.registry import stage_task
from tasks.retries import IO_RETRIES

CURATED_FILES = ("curated.jsonl", "curated.parquet", "curation.json")


class Exported(BaseModel):
    """Where a run's outputs went: the location and each output's URI (run.json last)."""

    location: str
    outputs: dict[str, str]


def output_location(cfg: FinescopeConfig) -> str:
    """`config.output`, or `<store>/outputs/<name>`."""
    return cfg.output or output_uri(output_uri(cfg.store, OUTPUTS_DIR), run_name(cfg))


def run_facts(
    cfg: FinescopeConfig,
    curated: StageManifest | None,
    prune_info: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> RunFacts:
    """What the cards say about this run."""
    return RunFacts(
        name=run_name(cfg),
        base_model=cfg.model,
        base_model_id=base_model_id(cfg.model, Path(cfg.model).is_dir()),
        method=cfg.curate.method,
        code_version=__version__,
        curated_records=int(curated.info.get("records", 0)) if curated else 0,
        prune=prune_info or {},
        metrics=metrics,
    )


def curated_outputs(
    cfg: FinescopeConfig, curated: StageManifest, facts: RunFacts, prefix: str = ""
) -> list[Output]:
    """The curated set as a dataset directory: the data files and a dataset card (`README.md`)."""
    src = artifact_dir(RunContext.of(cfg).store, curated)
    with open(src / "curated.jsonl", encoding="utf-8") as f:
        first = f.readline()
    fields = list(json.loads(first)) if first.strip() else []
    card = dataset_card("curated", facts, int(curated.info.get("records", 0)), ["curated.jsonl"], fields)
    return [Output(f"{prefix}{name}", source=src / name) for name in CURATED_FILES] + [
        Output(f"{prefix}README.md", text=card)
    ]


def pruned_output(cfg: FinescopeConfig, pruned: StageManifest, facts: RunFacts) -> Output:
    return Output(
        "pruned-model",
        source=artifact_dir(RunContext.of(cfg).store, pruned) / "model",
        files={"README.md": model_card("pruned", facts)},
    )


def specialize_outputs(
    cfg: FinescopeConfig,
    report: StageManifest,
    curated: StageManifest,
    pruned: StageManifest,
    distilled: StageManifest,
    tuned: StageManifest,
    metrics: dict[str, Any],
) -> list[Output]:
    """Report files, both models with cards, the adapter pointing at the exported pruned model (LoRA
    tuning only: `finetune.method: full` has no adapter), the data."""
    store = RunContext.of(cfg).store
    facts = dataclasses.replace(
        run_facts(cfg, curated, pruned.info, metrics), tuning=str(tuned.info.get("method", "lora"))
    )
    report_dir = artifact_dir(store, report)
    outputs = [
        Output(p.name, source=p)
        for p in sorted(report_dir.iterdir())
        if p.is_file() and not p.name.startswith("_")
    ]
    tuned_dir = artifact_dir(store, tuned)
    outputs += [
        pruned_output(cfg, pruned, facts),
        Output("tuned-model", source=tuned_dir / "merged", files={"README.md": model_card("tuned", facts)}),
    ]
    if (tuned_dir / "adapter").is_dir():
        adapter_config = json.loads(
            (tuned_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8")
        )
        # The adapter applies to the pruned model exported beside it, not to the store's copy of it.
        adapter_config["base_model_name_or_path"] = output_uri(output_location(cfg), "pruned-model")
        outputs.append(
            Output(
                "tuned-adapter",
                source=tuned_dir / "adapter",
                files={
                    "README.md": model_card("adapter", facts),
                    "adapter_config.json": json.dumps(adapter_config, indent=2),
                },
            )
        )
    distilled_file = artifact_dir(store, distilled) / "distilled.jsonl"
    rows = read_distilled(distilled_file)
    fields = list(dict.fromkeys(k for row in rows for k in row))  # text rows and request rows differ
    card = dataset_card("distilled", facts, len(rows), ["distilled.jsonl"], fields)
    outputs += [
        Output("distilled/distilled.jsonl", source=distilled_file),
        Output("distilled/README.md", text=card),
    ]
    return outputs + curated_outputs(cfg, curated, facts, prefix="curated/")


class RunRecord(BaseModel):
    """What run.json says of a run beside its stages and outputs: prepared by the flow, which holds the
    configuration, so the export task receives data, not the configuration."""

    location: str
    """The run's output location (`output_location`)."""
    name: str
    config: dict[str, Any]
    """The whole configuration, as run.json records it."""
    models: dict[str, dict[str, str]]
    summary: str
    """One line of the run's main settings (`finescope_core.settings.summary`)."""
    finetune_method: dict[str, Any] | None = None
    """How `finetune.method` was resolved, and why (`finescope_core.finetune_choice.MethodChoice`);
    None for a flow that does not tune."""

    @classmethod
    def of(cls, cfg: FinescopeConfig, finetune_method: dict[str, Any] | None = None) -> RunRecord:
        return cls(
            location=output_location(cfg),
            name=run_name(cfg),
            config=json.loads(cfg.model_dump_json()),
            models=model_identities(cfg),
            summary=summary(cfg),
            finetune_method=finetune_method,
        )


def run_manifest(
    run: RunRecord, flow: str, stages: dict[str, Any], seconds: float, outputs: dict[str, str]
) -> str:
    """run.json: parameters, every stage's artifact URI and key, the code version, every output's URI."""
    from prefect.runtime import deployment, flow_run

    manifest = {
        "code_version": code_version(),
        "flow": flow,
        "name": run.name,
        "flow_run": {"id": flow_run.id, "name": flow_run.name, "deployment": deployment.name},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "config": run.config,
        "models": run.models,
        **({"finetune_method": run.finetune_method} if run.finetune_method is not None else {}),
        "stages": stages,
        "outputs": outputs,
    }
    return json.dumps(manifest, indent=2, default=str)


def model_identities(cfg: FinescopeConfig) -> dict[str, dict[str, str]]:
    """What the keys knew each model by: a local directory's content hash, a hub id's commit (`revision`).
    The bundled default is listed under `stages` (its `models` artifact)."""
    specs = {"model": cfg.model, "teacher.model": cfg.teacher.model}
    local_or_hub = {field: spec for field, spec in specs.items() if spec not in (DEFAULT_MODEL, "base")}
    return {field: model_identity(spec) for field, spec in local_or_hub.items()}


@stage_task(name="export", cache_policy=NO_CACHE, **IO_RETRIES)
def export_task(
    ctx: RunContext, run: RunRecord, flow: str, outputs: list[Output], stages: dict[str, Any], seconds: float
) -> Exported:
    """Write `outputs`, then run.json (listing them) last, to the run's output location."""
    location = run.location
    written = export_outputs(outputs, location, ctx.storage_options())
    written["run.json"] = output_uri(location, "run.json")
    manifest = run_manifest(run, flow, stages, seconds, written)
    export_outputs([Output("run.json", text=manifest)], location, ctx.storage_options())
    logger().info("outputs exported to %s (%d items)", location, len(written))
    # Every output's URI in the UI, so a deployment run says where its model and data went.
    rows = [{"output": name, "uri": uri} for name, uri in written.items()]
    create_table_artifact(
        rows, key=slug(f"{flow}-{run.name}-outputs"), description=f"outputs in {location}; {run.summary}"
    )
    return Exported(location=location, outputs=written)

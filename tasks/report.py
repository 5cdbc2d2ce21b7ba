"""The metrics document and the task of the `report` stage: report.md with plots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from finescope_core import report as core
from finescope_core.evaluate import (
    comparisons,
    metrics_schema_errors,
    primary_metric,
)
from finescope_core.report import METRICS_FILE, REPORT_FILE, ReportInputs, ReportSettings
from finescope_core.run_warnings import duplicate_warnings, eval_set_warnings, fallback_warnings
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, run_cached
from tasks.context import RunContext
from tasks.keymodels import StageKey, StageKeyModel
from tasks.progress import Progress
from tasks.registry import Stage, stage_task
from tasks.retries import STORE_RETRIES
from tasks.teacher import distillation_info

# CurateResult's stage fields and their names in metrics.json's stage_seconds, in pipeline order.
CURATE_SECONDS = {
    "corpus": "corpus",
    "seeds": "seeds",
    "sae_corpus": "sae-corpus",
    "saliency": "saliency",
    "activations": "activations-corpus",
    "seed_activations": "activations-seeds",
    "sae_activations": "activations-sae-corpus",
    "sae": "sae",
    "curated": "curated",
}


def compute_seconds(m: StageManifest) -> float:
    """The seconds a stage took; a fanned-out stage (activations, sae) adds its parts' (`parts_seconds`), the
    gathering step alone being instant: compute time summed over workers, not wall time."""
    return m.seconds + float(m.info.get("parts_seconds", 0.0))


def stage_seconds(
    curate: dict[str, StageManifest | None],
    variants: dict[str, list[StageManifest]],
    evaluations: dict[str, StageManifest],
    codes: list[StageManifest] | None = None,
) -> dict[str, float]:
    """Seconds each stage took when computed (`compute_seconds`; a cached stage reports its original time).

    Args:
        curate: the curate stages by CurateResult field name (`CURATE_SECONDS`); None for skipped ones.
        variants: each variant's (pruned, distilled, tuned) by variant name ("" for the curated one).
        codes: the corpus's per-shard code artifacts (`sae` runs): one `sae-codes` entry, their sum.
    """
    out: dict[str, float] = {}
    for f in CURATE_SECONDS:
        if (m := curate.get(f)) is not None:
            out[CURATE_SECONDS[f]] = round(compute_seconds(m), 1)
        if f == "sae" and codes:
            out["sae-codes"] = round(sum(c.seconds for c in codes), 1)
    for name, stages in variants.items():
        for m in stages:
            out[f"{m.stage}{'-' + name if name else ''}"] = round(m.seconds, 1)
    for name, m in evaluations.items():
        out[f"evaluate-{name}"] = round(m.seconds, 1)
    return out


def metrics_document(
    evaluations: dict[str, StageManifest],
    seconds: dict[str, float],
    evaluation: dict[str, Any] | None = None,
    distilled: dict[str, StageManifest] | None = None,
    items: dict[str, dict[str, Any] | None] | None = None,
    record_sets: dict[str, StageManifest | None] | None = None,
) -> dict[str, Any]:
    """`metrics.json`: {"models": {name: metrics}, "primary": {metric, why}, "comparisons": [...],
    "evaluation": how the eval sets were made, "stage_seconds": {...}}, schema-checked.

    Args:
        distilled: each variant's distilled manifest by variant name ("" for the curated one); adds
            `distillation`: {variant: teacher kept / fallback counts by reason, generation budget}.
        items: each evaluation's per-item numbers by model name (`tasks.evaluate.evaluation_items`);
            adds `comparisons`, the paired comparisons of `finescope_core.evaluate.paired.comparisons`
            (tuned vs every other model, each baseline's tuned model vs base).
        record_sets: the record stages whose removed duplicates are warned of, by the name the warning
            gives them (`corpus`, `curate.sae_corpus`); None entries are skipped.

    `warnings` (always there, perhaps empty): duplicates removed, teacher fallbacks, small evaluation
    sets (`finescope_core.run_warnings`), in that order; the report shows them first.
    """
    doc: dict[str, Any] = {"models": {name: m.info for name, m in evaluations.items()}}
    doc["primary"] = primary_metric(doc["models"])
    if items is not None:
        doc["comparisons"] = comparisons({name: items.get(name) for name in evaluations})
    if evaluation is not None:
        doc["evaluation"] = evaluation
    doc["stage_seconds"] = seconds
    if distilled:
        doc["distillation"] = {name or "curated": distillation_info(m) for name, m in distilled.items()}
    doc["warnings"] = [
        w
        for what, m in (record_sets or {}).items()
        if m is not None
        for w in duplicate_warnings(m.info, what)
    ]
    doc["warnings"] += fallback_warnings(doc.get("distillation") or {}) + eval_set_warnings(evaluation or {})
    errors = metrics_schema_errors(doc)
    if errors:
        raise ValueError("metrics.json would be malformed: " + "; ".join(errors))
    return doc


class ReportKey(StageKeyModel):
    """`report`: what the report shows, on the metrics document, the curated set and the pruned model."""

    STAGE = "report"
    # 3: a "Layer weights" section, intervals and comparisons; 4: paired comparisons; 5: the primary
    # metric first (a section, and the first column of the evaluation table); the comparison models in
    # the paper's Table 1 layout, every model paired against base
    VERSION = "5"
    CODE = ("finescope_core.report_stage", "finescope_core.report", "finescope_core.evaluate")
    CONFIG = {"ratio": "prune.ratio", "method": "curate.method", "k_act": "curate.k_act"}

    ratio: float
    method: str
    k_act: int


def report_key(
    settings: ReportSettings, metrics: dict[str, Any], curated_sha: str, pruned_sha: str
) -> StageKey:
    metrics_sha = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()
    inputs = {"metrics": metrics_sha, "curated": curated_sha, "pruned": pruned_sha}
    return ReportKey(ratio=settings.ratio, method=settings.method, k_act=settings.k_act, inputs=inputs).spec()


REPORT = Stage(
    "report",
    ReportKey,
    upstream=("curated", "pruned", "evaluation"),
    core=core.run,
    files=(REPORT_FILE, METRICS_FILE),
)


@stage_task(REPORT, cache_policy=RUN_RESULTS, **STORE_RETRIES)
def report_task(
    section: ReportSettings, ctx: RunContext, curate: Any, metrics: dict[str, Any], pruned: StageManifest
) -> StageManifest:
    """report.md with plots: saliency, SAE metrics, retrieval scores + examples, parameters, evaluation."""
    store = ctx.store

    def build(work: Path) -> dict[str, Any]:
        inputs = ReportInputs(
            curated_dir=artifact_dir(store, curate.curated),
            metrics=metrics,
            prune_info=pruned.info,
            saliency_dir=artifact_dir(store, curate.saliency) if curate.saliency else None,
            sae_metrics=dict(zip(curate.layers, curate.sae.info["metrics"], strict=True))
            if curate.sae
            else None,
        )
        return core.run(inputs, section, ctx.stage_context(), work, Progress("report"))

    return run_cached(store, report_key(section, metrics, curate.curated.sha256, pruned.sha256), build)

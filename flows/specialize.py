"""The `specialize` flow: curate -> prune -> teacher -> LoRA -> evaluate -> report (every stage cached)."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from finescope_core.config import FinescopeConfig
from finescope_core.data import Record
from finescope_core.report import embed_images
from flows.curate import CurateResult, curate_flow
from flows.prune import check_ratio
from flows.runtime import prefect_results
from tasks.common import StageManifest, artifact_dir, artifact_key, logger, open_store
from tasks.data import load_data, model_task
from tasks.evaluate import eval_inputs, evaluate_task
from tasks.export import Exported, export_task, specialize_outputs
from tasks.finetune import finetune_task
from tasks.prune import (
    baseline_records,
    curated_split,
    prune_task,
    pruning_texts,
    texts_sha,
)
from tasks.report import CURATE_SECONDS, metrics_document, report_task, stage_seconds
from tasks.teacher import teacher_ref, teacher_task


class Variant(BaseModel):
    """One prune + teacher + tune pipeline (the FineScope one, or a baseline at the same ratio)."""

    pruned: StageManifest
    distilled: StageManifest
    tuned: StageManifest


class SpecializeResult(BaseModel):
    curate: CurateResult
    variants: dict[str, Variant]
    evaluations: dict[str, StageManifest]
    metrics: dict[str, Any]
    report: StageManifest
    exported: Exported | None = None

    def manifests(self) -> dict[str, Any]:
        """Every stage's manifest by name, for run.json."""
        stages = self.curate.manifests()
        for name, variant in self.variants.items():
            for stage, manifest in variant.model_dump().items():
                stages[f"{stage}-{name}" if name else stage] = manifest
        stages.update({f"evaluate-{k}": v.model_dump() for k, v in self.evaluations.items()})
        stages["report"] = self.report.model_dump()
        return stages


def _variant(cfg: FinescopeConfig, base, prune_texts: list[str], records: list[Record], tag: str) -> Variant:
    pruned = prune_task(cfg, base, prune_texts, texts_sha(prune_texts))
    teacher = teacher_ref(cfg, base)
    distilled = teacher_task(cfg, teacher, records, tag)
    tuned = finetune_task(cfg, pruned, distilled, tag, teacher)
    return Variant(pruned=pruned, distilled=distilled, tuned=tuned)


@flow(name="specialize", log_prints=True)
def specialize_flow(config: FinescopeConfig) -> SpecializeResult:
    """From seeds and a corpus to a pruned, teacher-distilled, LoRA-tuned domain model with a report.

    The outputs (report, metrics, pruned and tuned models with cards, the adapter, the curated and
    distilled data, run.json) go to the run's output location.
    """
    start = time.perf_counter()
    check_ratio(config)
    eval_inputs(config, [])  # bad eval files fail here, before any work
    with prefect_results(config):
        result = _specialize(config)
        main = result.variants[""]
        outputs = specialize_outputs(config, result.report, result.curate.curated, main.pruned, main.distilled,
                                     main.tuned, result.metrics)  # fmt: skip
        result.exported = export_task(config, "specialize", outputs, result.manifests(), time.perf_counter() - start)
    return result


def _specialize(config: FinescopeConfig) -> SpecializeResult:
    curated = curate_flow(config, export=False)
    train_rows, held_rows = curated_split(config, curated.curated)
    corpus = load_data(config, curated.corpus)
    by_id = {r.id: r for r in corpus.records}
    train = [by_id[r["id"]] for r in train_rows]
    held_texts = [by_id[r["id"]].text for r in held_rows]
    logger().info("curated set: %d records for pruning/tuning, %d held out for evaluation", len(train), len(held_texts))
    base = model_task(config)
    variants = {"": _variant(config, base, pruning_texts(config, curated.corpus, curated.curated), train, "curated")}
    for name in config.evaluate.baselines:
        records = baseline_records(name, corpus.records, {r["id"] for r in held_rows}, len(train), config.seed)
        variants[name] = _variant(config, base, [r.text for r in records], records, name)

    store = open_store(config)
    evaluations = {"base": evaluate_task(config, "base", base.path, base.sha256, held_texts)}
    for name, v in variants.items():
        suffix = f"-{name}" if name else ""
        evaluations[f"pruned{suffix}"] = evaluate_task(
            config, f"pruned{suffix}", str(artifact_dir(store, v.pruned) / "model"), v.pruned.sha256, held_texts
        )
        evaluations[f"tuned{suffix}"] = evaluate_task(
            config, f"tuned{suffix}", str(artifact_dir(store, v.tuned) / "merged"), v.tuned.sha256, held_texts
        )
    seconds = _stage_seconds(curated, variants, evaluations)
    metrics = metrics_document(evaluations, seconds, {name: v.distilled for name, v in variants.items()})
    report = report_task(config, curated, metrics, variants[""].pruned)
    _publish(config, metrics, report)
    return SpecializeResult(curate=curated, variants=variants, evaluations=evaluations, metrics=metrics, report=report)


def _stage_seconds(curated: CurateResult, variants: dict[str, Variant], evaluations: dict[str, StageManifest]) -> dict[str, float]:
    curate = {field: getattr(curated, field) for field in CURATE_SECONDS}
    return stage_seconds(curate, {name: [v.pruned, v.distilled, v.tuned] for name, v in variants.items()}, evaluations)


def _publish(cfg: FinescopeConfig, metrics: dict[str, Any], report: StageManifest) -> None:
    rows = [{"model": name, **{k: v for k, v in m.items() if k != "n"}} for name, m in metrics["models"].items()]
    create_table_artifact(rows, key=artifact_key("specialize", cfg, "evaluation"), description="base / pruned / tuned")
    create_table_artifact([{"stage": k, "seconds": v} for k, v in metrics["stage_seconds"].items()],
                          key=artifact_key("specialize", cfg, "stage-seconds"))  # fmt: skip
    report_dir = artifact_dir(open_store(cfg), report)
    # The UI has no directory to resolve the plots' relative links against: they travel inline.
    body = embed_images((report_dir / "report.md").read_text(encoding="utf-8"), report_dir)
    create_markdown_artifact(body, key=artifact_key("specialize", cfg, "report"), description="finescope report")

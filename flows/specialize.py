"""The `specialize` flow: curate -> prune -> teacher -> LoRA -> evaluate -> report (every stage cached)."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from finescope_core.config import FinescopeConfig
from finescope_core.data import Record
from finescope_core.evaluate import check_harness_config
from finescope_core.memplan import check_memory
from finescope_core.report import embed_images, harness_rows, metric_rows, paired_rows
from finescope_core.run_warnings import eval_set_warnings, fallback_warnings
from finescope_core.settings import summary
from flows.curate import CurateResult, curate_flow
from flows.placement import place
from flows.prune import check_ratio
from flows.runtime import prefect_results
from flows.ui import detached, namer, tagged
from tasks.caching import StageManifest, artifact_dir
from tasks.context import artifact_key, logger, open_store
from tasks.data import load_data, model_task, read_inputs
from tasks.evalset import candidate_items, decontaminate, eval_files, holdout, training_texts
from tasks.evaluate import evaluate_task, evaluation_items
from tasks.export import Exported, export_task, specialize_outputs
from tasks.finetune import finetune_task
from tasks.prune import (
    baseline_records,
    curated_records,
    prune_task,
    pruning_texts,
    texts_sha,
    training_pool,
)
from tasks.report import CURATE_SECONDS, metrics_document, report_task, stage_seconds
from tasks.teacher import check_teacher_backend, teacher_ref, teacher_task


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
    # Each variant runs its own prune, teacher and tune tasks: named by variant, they tell apart in the UI.
    prune = prune_task.with_options(task_run_name=f"prune-{tag}")
    pruned = prune(cfg, base, prune_texts, texts_sha(prune_texts))
    teacher = teacher_ref(cfg, base)
    distilled = teacher_task(cfg, teacher, records, tag)
    tuned = finetune_task(cfg, pruned, distilled, tag, teacher)
    return Variant(pruned=pruned, distilled=distilled, tuned=tuned)


@flow(name="specialize", flow_run_name=namer("specialize"), log_prints=True)
def specialize_flow(config: FinescopeConfig) -> SpecializeResult:
    """From seeds and a corpus to a pruned, teacher-distilled, LoRA-tuned domain model with a report.

    The outputs (report, metrics, pruned and tuned models with cards, the adapter, the curated and
    distilled data, run.json) go to the run's output location.
    """
    start = time.perf_counter()
    check_ratio(config)
    check_harness_config(
        config.evaluate
    )  # a missing lm-eval include dir or an unknown task name: refused first
    check_teacher_backend(config)  # vllm without the package or a GPU: refused before any model work
    check_memory(config)  # a stage predicted above the memory budget: refused before any model load
    # Bad eval files, an eval file the corpus already holds, an empty split: refused here, before any work.
    config = place(config, "specialize")  # another run's outputs are never replaced in silence
    seeds, prepared = read_inputs(config)
    holdout(config, seeds, prepared.corpus, eval_files(config), evaluating=True)
    with prefect_results(config), tagged(config):
        result = _specialize(config)
        main = result.variants[""]
        outputs = specialize_outputs(
            config,
            result.report,
            result.curate.curated,
            main.pruned,
            main.distilled,
            main.tuned,
            result.metrics,
        )
        result.exported = export_task(
            config, "specialize", outputs, result.manifests(), time.perf_counter() - start
        )
    return result


def _specialize(config: FinescopeConfig) -> SpecializeResult:
    curated = detached(curate_flow(config, export=False, evaluating=True))
    held = curated.held_out
    corpus, seeds = load_data(config, curated.corpus), load_data(config, curated.seeds)
    train = curated_records(config, curated.corpus, curated.curated)
    logger().info(
        "curated set: %d records for pruning/tuning; %d corpus records held out for evaluation",
        len(train),
        len(held.excluded),
    )
    base = model_task(config)
    main_texts = pruning_texts(
        config, curated.corpus, curated.curated, seeds=curated.seeds, excluded=held.excluded
    )
    variants = {"": _variant(config, base, main_texts, train, "curated")}
    training = {"": (train, main_texts)}
    pool = training_pool(corpus.records, seeds.records, held.excluded)
    for name in config.evaluate.baselines:
        records = baseline_records(name, pool, len(train), config.seed)
        texts = [r.text for r in records]
        variants[name] = _variant(config, base, texts, records, name)
        training[name] = (records, texts)

    files = eval_files(config)
    domain, general, info = candidate_items(config, seeds, corpus, held, files)
    learned = [
        t for name, v in variants.items() for t in training_texts(config, *training[name], v.distilled)
    ]
    data = decontaminate(domain, general, learned, info, files)
    logger().info(
        "evaluation: %d domain items (%d dropped as contaminated), %d general items",
        len(data.domain),
        data.info["domain"]["dropped_ngram"] + data.info["domain"]["dropped_near_duplicate"],
        len(data.general),
    )
    payload = data.payload()
    store = open_store(config)
    evaluations = {"base": evaluate_task(config, "base", base.path, base.sha256, payload)}
    for name, v in variants.items():
        suffix = f"-{name}" if name else ""
        evaluations[f"pruned{suffix}"] = evaluate_task(
            config, f"pruned{suffix}", str(artifact_dir(store, v.pruned) / "model"), v.pruned.sha256, payload
        )
        evaluations[f"tuned{suffix}"] = evaluate_task(
            config, f"tuned{suffix}", str(artifact_dir(store, v.tuned) / "merged"), v.tuned.sha256, payload
        )
    seconds = _stage_seconds(curated, variants, evaluations)
    metrics = metrics_document(
        evaluations,
        seconds,
        evaluation=data.info,
        distilled={name: v.distilled for name, v in variants.items()},
        items=evaluation_items(store, evaluations),
        record_sets={"corpus": curated.corpus, "curate.sae_corpus": curated.sae_corpus},
    )
    _log_warnings(metrics)
    report = report_task(config, curated, metrics, variants[""].pruned)
    _publish(config, metrics, report)
    return SpecializeResult(
        curate=curated, variants=variants, evaluations=evaluations, metrics=metrics, report=report
    )


def _log_warnings(metrics: dict[str, Any]) -> None:
    """The teacher's fallbacks and small evaluation sets of metrics.json's `warnings`, as log WARNINGs (the
    curate subflow logged the duplicates where it removed them)."""
    for line in fallback_warnings(metrics.get("distillation") or {}) + eval_set_warnings(
        metrics["evaluation"]
    ):
        logger().warning("%s", line)


def _stage_seconds(
    curated: CurateResult, variants: dict[str, Variant], evaluations: dict[str, StageManifest]
) -> dict[str, float]:
    curate = {field: getattr(curated, field) for field in CURATE_SECONDS}
    return stage_seconds(
        curate,
        {name: [v.pruned, v.distilled, v.tuned] for name, v in variants.items()},
        evaluations,
        curated.codes,
    )


def _publish(cfg: FinescopeConfig, metrics: dict[str, Any], report: StageManifest) -> None:
    rows = metric_rows(metrics["models"])
    create_table_artifact(
        rows,
        key=artifact_key("specialize", cfg, "evaluation"),
        description=f"every model x metric: value [95 % interval] (n); {summary(cfg)}",
    )
    _publish_harness(cfg, metrics)
    if metrics.get("comparisons"):
        create_table_artifact(
            paired_rows(metrics["comparisons"]),
            key=artifact_key("specialize", cfg, "paired"),
            description="paired comparisons on the same items: ratio / difference "
            f"[95 % bootstrap interval over items]; {summary(cfg)}",
        )
    create_table_artifact(
        [{"stage": k, "seconds": v} for k, v in metrics["stage_seconds"].items()],
        key=artifact_key("specialize", cfg, "stage-seconds"),
        description=summary(cfg),
    )
    report_dir = artifact_dir(open_store(cfg), report)
    # The UI has no directory to resolve the plots' relative links against: they travel inline.
    body = embed_images((report_dir / "report.md").read_text(encoding="utf-8"), report_dir)
    create_markdown_artifact(
        body, key=artifact_key("specialize", cfg, "report"), description=f"finescope report: {summary(cfg)}"
    )


def _publish_harness(cfg: FinescopeConfig, metrics: dict[str, Any]) -> None:
    """The lm-evaluation-harness results as a table artifact (task × model, value [95 % CI]), when run."""
    rows = harness_rows(metrics["models"])
    if rows:
        create_table_artifact(
            rows,
            key=artifact_key("specialize", cfg, "lm-eval"),
            description="lm-evaluation-harness: value [95 % bootstrap CI] per task and model; "
            f"{summary(cfg)}",
        )

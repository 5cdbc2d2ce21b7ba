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
from finescope_core.finetune_choice import MethodChoice, resolve_finetune
from finescope_core.memplan_recover import check_run_memory
from finescope_core.recover import PoolDraw
from finescope_core.report import ReportSettings, embed_images, harness_rows, metric_rows, paired_rows
from finescope_core.run_warnings import eval_set_warnings, fallback_warnings
from finescope_core.settings import summary
from flows.baselines import PRUNED_BASELINES, base_tuned, check_baselines, generic_records
from flows.curate import CurateResult, curate_stages
from flows.placement import place
from flows.prune import check_ratio
from flows.runtime import prefect_results
from flows.ui import namer, tagged
from tasks.caching import StageManifest, artifact_dir
from tasks.context import RunContext, artifact_key, logger
from tasks.data import load_data, model_task, read_inputs
from tasks.evalset import EvalData, candidate_items, decontaminate, eval_files, holdout, training_texts
from tasks.evaluate import evaluate_task, evaluation_items
from tasks.export import Exported, RunRecord, export_task, specialize_outputs
from tasks.finetune import finetune_task
from tasks.models import ModelRef
from tasks.planning import current_planner, plannable
from tasks.prune import (
    baseline_records,
    curated_records,
    prune_task,
    pruning_texts,
    training_pool,
)
from tasks.recover import recover_task, recovery_pool
from tasks.report import CURATE_SECONDS, metrics_document, report_task, stage_seconds
from tasks.teacher import check_teacher_backend, teacher_ref, teacher_task


class Variant(BaseModel):
    """One prune + (recover) + teacher + tune pipeline (the FineScope one, or a baseline at the same
    ratio); `base_tuned` has no pruned model and shares the curated variant's distilled data."""

    pruned: StageManifest | None
    distilled: StageManifest
    tuned: StageManifest
    recovered: StageManifest | None = None
    """The distillation phase over the variant's pool (None: `recover.tokens` is 0)."""

    def stages(self) -> list[StageManifest]:
        """The variant's stages in the order they run."""
        stages = [self.pruned, self.recovered, self.distilled, self.tuned]
        return [m for m in stages if m is not None]


class SpecializeResult(BaseModel):
    curate: CurateResult
    variants: dict[str, Variant]
    evaluations: dict[str, StageManifest]
    metrics: Any
    """metrics.json (a dict; in a dry run, what waits for the evaluations)."""
    report: StageManifest
    exported: Exported | None = None

    def manifests(self) -> dict[str, Any]:
        """Every stage's manifest by name, for run.json."""
        stages = self.curate.manifests()
        for name, variant in self.variants.items():
            for manifest in variant.stages():
                stages[f"{manifest.stage}-{name}" if name else manifest.stage] = manifest.model_dump()
        stages.update({f"evaluate-{k}": v.model_dump() for k, v in self.evaluations.items()})
        stages["report"] = self.report.model_dump()
        return stages


@flow(name="specialize", flow_run_name=namer("specialize"), log_prints=True)
def specialize_flow(config: FinescopeConfig) -> SpecializeResult:
    """From seeds and a corpus to a pruned, teacher-distilled, LoRA-tuned domain model with a report.

    The outputs (report, metrics, pruned and tuned models with cards, the adapter, the curated and
    distilled data, run.json) go to the run's output location.
    """
    start = time.perf_counter()
    check_ratio(config)
    # A missing lm-eval include dir or an unknown task name: refused first.
    check_harness_config(config.evaluate)
    # vllm without the package or a GPU: refused before any model work.
    check_teacher_backend(config.teacher, config.device)
    # finetune.method/lr auto resolved once, from the model's config and the budget: the keys hold the result.
    config, choice = resolve_finetune(config)
    check_run_memory(config)  # a stage predicted above the memory budget: refused before any model load
    check_baselines(config)  # a bad evaluate.generic_file, base_tuned above the budget: refused here too
    # Bad eval files, an eval file the corpus already holds, an empty split: refused here, before any work.
    config = place(config, "specialize")  # another run's outputs are never replaced in silence
    seeds, prepared = read_inputs(config)
    holdout(config, seeds, prepared.corpus, eval_files(config), evaluating=True)
    ctx = RunContext.of(config)
    with prefect_results(config), tagged(config):
        result = specialize_graph(config, ctx, choice)
        _publish(config, result.metrics, result.report)
        main = result.variants[""]
        assert main.pruned is not None, "the curated variant always prunes"
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
            ctx,
            RunRecord.of(config, choice.to_json()),
            "specialize",
            outputs,
            result.manifests(),
            time.perf_counter() - start,
        )
    return result


class Training(BaseModel):
    """One variant's training data: the records the teacher answers, the texts that score pruning."""

    records: list[Record]
    texts: list[str]


@plannable
def curated_training(config: FinescopeConfig, ctx: RunContext, curated: CurateResult) -> Training:
    """The curated variant's data: the curated records; the pruning texts `prune.data` names."""
    records = curated_records(ctx, curated.corpus, curated.curated)
    texts = pruning_texts(
        config.prune,
        ctx,
        curated.corpus,
        curated.curated,
        seeds=curated.seeds,
        excluded=curated.held_out.excluded,
    )
    logger().info(
        "curated set: %d records for pruning/tuning; %d corpus records held out for evaluation",
        len(records),
        len(curated.held_out.excluded),
    )
    return Training(records=records, texts=texts)


@plannable
def baseline_training(ctx: RunContext, name: str, curated: CurateResult, main: Training) -> Training:
    """A baseline's data, from the training pool (never the evaluation split): its records are its texts."""
    corpus, seeds = load_data(ctx, curated.corpus), load_data(ctx, curated.seeds)
    pool = training_pool(corpus.records, seeds.records, curated.held_out.excluded)
    records = baseline_records(name, pool, len(main.records), ctx.seed)
    return Training(records=records, texts=[r.text for r in records])


def _variant(
    config: FinescopeConfig,
    ctx: RunContext,
    base: ModelRef,
    teacher: ModelRef,
    data: Training,
    tag: str,
    pool: PoolDraw | None,
    choice: MethodChoice,
) -> Variant:
    # Each variant runs its own prune, teacher and tune tasks: named by variant, they tell apart in the UI.
    pruned = prune_task(config.prune, ctx, base, data.texts, tag)
    device_map = config.teacher.device_map
    recovered = None
    if pool is not None:  # recover.tokens > 0: tuning starts from the recovered model
        recovered = recover_task(config.recover, ctx, pruned, teacher, config.finetune, pool, tag, device_map)
    distilled = teacher_task(config.teacher, ctx, teacher, data.records, tag)
    kd_teacher = teacher if config.finetune.kd_weight > 0 else None  # the loss reads the teacher
    start = recovered if recovered is not None else pruned
    tuned = finetune_task(
        config.finetune, ctx, start, distilled, tag, kd_teacher, device_map, choice.to_json()
    )
    return Variant(pruned=pruned, distilled=distilled, tuned=tuned, recovered=recovered)


def recovery_pools(
    config: FinescopeConfig, ctx: RunContext, curated: CurateResult, variants: list[str]
) -> dict[str, PoolDraw | None]:
    """Each variant's recovery pool (the curated one's by score, a baseline's at random); None for every
    variant when `recover.tokens` is 0 (no phase)."""
    if config.recover.tokens == 0:
        return {name: None for name in variants}
    excluded = list(curated.held_out.excluded)
    return {
        name: recovery_pool(
            config.recover, ctx, curated.corpus, curated.seeds, curated.curated, excluded, name
        )
        for name in variants
    }


@plannable
def evaluation_data(
    config: FinescopeConfig,
    ctx: RunContext,
    curated: CurateResult,
    training: dict[str, Training],
    distilled: dict[str, StageManifest],
    pools: dict[str, PoolDraw | None],
) -> EvalData:
    """The evaluation items: the split or the eval files, less every item any variant learned from (its
    records, pruning texts, distilled rows and recovery pool)."""
    corpus, seeds = load_data(ctx, curated.corpus), load_data(ctx, curated.seeds)
    files = eval_files(config)
    domain, general, info = candidate_items(config, seeds, corpus, curated.held_out, files)
    learned = [
        t
        for name, data in training.items()
        for t in training_texts(ctx, data.records, data.texts, distilled[name])
    ]
    learned += [r.text for pool in pools.values() if pool is not None for r in pool.records]
    evaluation = decontaminate(domain, general, learned, info, files)
    dropped = evaluation.info["domain"]["dropped_ngram"] + evaluation.info["domain"]["dropped_near_duplicate"]
    logger().info(
        "evaluation: %d domain items (%d dropped as contaminated), %d general items",
        len(evaluation.domain),
        dropped,
        len(evaluation.general),
    )
    return evaluation


@plannable
def run_metrics(
    ctx: RunContext,
    curated: CurateResult,
    variants: dict[str, Variant],
    evaluations: dict[str, StageManifest],
    evaluation: EvalData,
) -> dict[str, Any]:
    """metrics.json: every evaluation with its intervals, the paired comparisons, the stages' seconds,
    and (when it ran) each variant's recovery phase."""
    metrics = metrics_document(
        evaluations,
        _stage_seconds(curated, variants, evaluations),
        evaluation=evaluation.info,
        distilled={name: v.distilled for name, v in variants.items()},
        items=evaluation_items(ctx.store, evaluations),
        record_sets={"corpus": curated.corpus, "curate.sae_corpus": curated.sae_corpus},
    )
    recovery = {name or "curated": v.recovered.info for name, v in variants.items() if v.recovered}
    if recovery:  # only then: with recover.tokens 0 the document (and the report's key) is as before
        metrics["recovery"] = recovery
    return metrics


def specialize_graph(
    config: FinescopeConfig, ctx: RunContext, choice: MethodChoice | None = None
) -> SpecializeResult:
    """The specialize pipeline's stages, as a run executes them and `store plan` plans them. `choice`: how
    the flow resolved `finetune.method` (None: resolved here, as the flow would)."""
    if choice is None:
        config, choice = resolve_finetune(config)
    curated = curate_stages(config, ctx, evaluating=True)
    base = model_task(ctx, ctx.model)
    teacher = teacher_ref(config.teacher, ctx, base)
    training: dict[str, Training] = {"": curated_training(config, ctx, curated)}
    for baseline in (b for b in config.evaluate.baselines if b in PRUNED_BASELINES):
        training[baseline] = (
            _generic_training(config, ctx, training[""])
            if baseline == "generic"
            else baseline_training(ctx, baseline, curated, training[""])
        )
    pools = recovery_pools(config, ctx, curated, list(training))
    variants = {
        name: _variant(config, ctx, base, teacher, data, name or "curated", pools[name], choice)
        for name, data in training.items()
    }
    if "base_tuned" in config.evaluate.baselines:  # the unpruned base tuned on the curated data: no prune
        main = variants[""]
        tuned = base_tuned(config, ctx, base, teacher, main.distilled, choice)
        variants["base_tuned"] = Variant(pruned=None, distilled=main.distilled, tuned=tuned)
    distilled = {name: v.distilled for name, v in variants.items()}
    evaluation = evaluation_data(config, ctx, curated, training, distilled, pools)
    payload = evaluation.payload()
    evaluations = {"base": evaluate_task(config.evaluate, ctx, "base", base, payload)}
    for name, v in variants.items():
        suffix = f"-{name}" if name else ""
        if v.pruned is not None:
            evaluations[f"pruned{suffix}"] = evaluate_task(
                config.evaluate, ctx, f"pruned{suffix}", v.pruned, payload
            )
        evaluations[f"tuned{suffix}"] = evaluate_task(
            config.evaluate, ctx, f"tuned{suffix}", v.tuned, payload
        )
    metrics = run_metrics(ctx, curated, variants, evaluations, evaluation)
    if current_planner() is None:  # a run, not a dry run: its warnings as soon as they are known
        _log_warnings(metrics)
    pruned = variants[""].pruned
    assert pruned is not None, "the curated variant always prunes"
    report = report_task(ReportSettings.of(config), ctx, curated, metrics, pruned)
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
        {name: _own_stages(name, v, variants[""]) for name, v in variants.items()},
        evaluations,
        curated.codes,
    )


def _own_stages(name: str, variant: Variant, main: Variant) -> list[StageManifest]:
    """A variant's stages for the stage seconds; one it shares with the curated variant (`base_tuned`'s
    distilled data) is counted once, there."""
    shared = {main.distilled.key} if name else set()
    return [m for m in variant.stages() if m.key not in shared]


@plannable
def _generic_training(config: FinescopeConfig, ctx: RunContext, main: Training) -> Training:
    """The `generic` baseline's data: `evaluate.generic_file` drawn to the curated set's size."""
    records = generic_records(config.evaluate, ctx, main.records)
    return Training(records=records, texts=[r.text for r in records])


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
    report_dir = artifact_dir(RunContext.of(cfg).store, report)
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

"""Task of the `evaluation` stage: every metric of one model, with bootstrap intervals (+ lm-eval tasks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task

from finescope_core.config import FinescopeConfig
from finescope_core.evaluate import (
    ITEMS_FILE,
    check_harness_config,
    evaluate_model,
    harness_include_sha,
    items_document,
)
from finescope_core.evaluate import with_harness as core_with_harness
from finescope_core.progress import no_progress
from finescope_core.store import ArtifactStore
from tasks.common import (
    GPU_TAGS,
    RUN_RESULTS,
    STORE_RETRIES,
    ModelStageKey,
    Progress,
    StageKey,
    StageManifest,
    artifact_dir,
    open_store,
    private_model,
    run_cached,
)
from tasks.identity import Precision, work_precision


class EvaluationKey(ModelStageKey):
    """`evaluation`: the scoring settings, on a model and the evaluation data (`EvalData.payload`, by content).

    The evaluation files, the split settings and the item counts reach it through that data.
    `evaluate.lm_eval_include` reaches it through the content hash of its task YAMLs and data (input `lm_eval`).
    """

    STAGE = "evaluation"
    # 3: per-item numbers (items.json) beside metrics.json, for paired comparisons
    # 4: lm-eval intervals by bootstrap.mean_interval with evaluate.bootstrap_resamples (was 2000 resamples)
    VERSION = "4"
    CODE = ("finescope_core.evaluate", "finescope_core.model")
    CONFIG = {
        "max_length": "evaluate.max_length",
        "max_new_tokens": "evaluate.max_new_tokens",
        "max_examples": "evaluate.max_examples",
        "bootstrap_resamples": "evaluate.bootstrap_resamples",
        "seed": "seed",
        "lm_eval_tasks": "evaluate.lm_eval_tasks",
        "lm_eval_limit": "evaluate.lm_eval_limit",
        "lm_eval_chat_template": "evaluate.lm_eval_chat_template",
    }

    max_length: int
    max_new_tokens: int
    max_examples: int
    bootstrap_resamples: int
    seed: int
    lm_eval_tasks: list[str]
    lm_eval_limit: int | None
    lm_eval_chat_template: str


def evaluation_key(
    cfg: FinescopeConfig, model_sha: str, data: dict[str, Any], precision: Precision | None = None
) -> StageKey:
    data_sha = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    inputs = {"model": model_sha, "data": data_sha}
    if cfg.evaluate.lm_eval_tasks and (include_sha := harness_include_sha(cfg.evaluate.lm_eval_include)):
        inputs["lm_eval"] = include_sha
    return EvaluationKey.of(cfg, inputs, precision).spec()


def with_harness(
    cfg: FinescopeConfig,
    model: Any,
    tok: Any,
    metrics: dict[str, Any],
    name: str,
    docs: dict[str, list[int]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`metrics` plus `lm_eval` (task -> metric -> value / CI / n) when `evaluate.lm_eval_tasks` is set, and
    lm-eval's per-sample values behind them (task -> metric -> doc ids / values; {} without tasks).

    `docs`: task -> the doc ids that passed the contamination check (`EvalData.lm_eval_docs`); a task
    not in it runs on its first documents."""
    # A progress bar only when lm-eval runs (each one is a Prefect artifact).
    progress = Progress(f"lm-eval {name}") if cfg.evaluate.lm_eval_tasks else no_progress
    return core_with_harness(model, tok, cfg.evaluate, metrics, seed=cfg.seed, progress=progress, docs=docs)


@task(
    name="evaluate", task_run_name="evaluate-{name}", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES
)
def evaluate_task(
    cfg: FinescopeConfig, name: str, model_path: str, model_sha: str, data: dict[str, Any]
) -> StageManifest:
    """Domain perplexity (raw and chat-formatted), general perplexity, MC accuracy / numeric exact match
    when given, each with a bootstrap 95 % interval; `data` is `tasks.evalset.EvalData.payload()`.

    The artifact holds metrics.json (also the manifest's info) and `ITEMS_FILE`, every metric's per-item
    numbers (lm-eval's per-sample values included), which paired comparisons between models read."""
    ran = work_precision(cfg)

    def build(work: Path) -> dict[str, Any]:
        check_harness_config(cfg.evaluate)  # a bad lm-eval task setup fails before the model loads
        model, tok = private_model(model_path, ran.device, ran.dtype)
        items: dict[str, Any] = {}
        metrics = evaluate_model(
            model,
            tok,
            domain_texts=data["domain"],
            chat_pairs=[tuple(p) for p in data["chat"]],
            general_texts=data["general"],
            mc_items=data["mc"],
            numeric_items=data["numeric"],
            cfg=cfg.evaluate,
            seed=cfg.seed,
            progress=Progress(f"evaluate {name}"),
            items=items,
        )
        metrics, samples = with_harness(cfg, model, tok, metrics, name, data.get("lm_eval_docs"))
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        doc = items_document(
            items, seed=cfg.seed, resamples=cfg.evaluate.bootstrap_resamples, lm_eval=samples
        )
        (work / ITEMS_FILE).write_text(json.dumps(doc))
        return metrics

    return run_cached(open_store(cfg), evaluation_key(cfg, model_sha, data, ran), build)


def evaluation_items(
    store: ArtifactStore, evaluations: dict[str, StageManifest]
) -> dict[str, dict[str, Any] | None]:
    """Each evaluation's per-item numbers (`ITEMS_FILE`), by model name; None for an artifact without them."""
    out: dict[str, dict[str, Any] | None] = {}
    for name, manifest in evaluations.items():
        path = artifact_dir(store, manifest) / ITEMS_FILE
        out[name] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return out

"""Task of the `evaluation` stage: every metric of one model, with bootstrap intervals (+ lm-eval tasks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from finescope_core import evaluate as core
from finescope_core.config import EvalConfig
from finescope_core.evaluate import (
    ITEMS_FILE,
    METRICS_FILE,
    EvalInputs,
    check_harness_config,
    harness_include_sha,
)
from finescope_core.store import ArtifactStore
from tasks import registry
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, run_cached
from tasks.context import RunContext
from tasks.identity import Precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, private_model
from tasks.progress import Progress
from tasks.registry import Stage, stage_task
from tasks.retries import GPU_TAGS, STORE_RETRIES


class EvaluationKey(ModelStageKey):
    """`evaluation`: the scoring settings, on a model and the evaluation data (`EvalData.payload`, by
    content).

    The evaluation files, the split settings and the item counts reach it through that data.
    `evaluate.lm_eval_include` reaches it through the content hash of its task YAMLs and data (input
    `lm_eval`).
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
    section: EvalConfig,
    ctx: RunContext,
    model_sha: str,
    data: dict[str, Any],
    precision: Precision | None = None,
) -> StageKey:
    data_sha = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    inputs = {"model": model_sha, "data": data_sha}
    if section.lm_eval_tasks and (include_sha := harness_include_sha(section.lm_eval_include)):
        inputs["lm_eval"] = include_sha
    return EvaluationKey.of(ctx.settings(evaluate=section), inputs, precision).spec()


EVALUATION = Stage(
    "evaluation",
    EvaluationKey,
    upstream=("models", "pruned", "tuned", "distilled"),
    core=core.run,
    files=(METRICS_FILE, ITEMS_FILE),
)


@stage_task(
    EVALUATION,
    label="evaluation ({name})",
    task_run_name="evaluation-{name}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **STORE_RETRIES,
)
def evaluate_task(
    section: EvalConfig, ctx: RunContext, name: str, model: ModelRef | StageManifest, data: dict[str, Any]
) -> StageManifest:
    """Domain perplexity (raw and chat-formatted), general perplexity, MC accuracy / numeric exact match
    when given, each with a bootstrap 95 % interval; `data` is `tasks.evalset.EvalData.payload()`.

    The artifact holds metrics.json (also the manifest's info) and `ITEMS_FILE`, every metric's per-item
    numbers (lm-eval's per-sample values included), which paired comparisons between models read."""
    ran = ctx.precision()
    if isinstance(model, ModelRef):
        model_path, model_sha = model.path, model.sha256
    else:  # a pruned or tuned artifact: keyed by the artifact's hash
        model_path, model_sha = str(registry.model_path(ctx.store, model)), model.sha256

    def build(work: Path) -> dict[str, Any]:
        check_harness_config(section)  # a bad lm-eval task setup fails before the model loads
        loaded, tok = private_model(model_path, ran.device, ran.dtype)
        inputs = EvalInputs(model=loaded, tokenizer=tok, data=data, name=name)
        return core.run(inputs, section, ctx.stage_context(ran), work, Progress(f"evaluate {name}"))

    return run_cached(ctx.store, evaluation_key(section, ctx, model_sha, data, ran), build)


def evaluation_items(
    store: ArtifactStore, evaluations: dict[str, StageManifest]
) -> dict[str, dict[str, Any] | None]:
    """Each evaluation's per-item numbers (`ITEMS_FILE`), by model name; None for an artifact without them."""
    out: dict[str, dict[str, Any] | None] = {}
    for name, manifest in evaluations.items():
        path = artifact_dir(store, manifest) / ITEMS_FILE
        out[name] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return out

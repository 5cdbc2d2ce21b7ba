"""Evaluation of base / pruned / tuned models: domain perplexity, multiple-choice accuracy, numeric
exact match.

Perplexity is token-level over all held-out texts (`perplexity`), on raw text and on the chat-formatted
response tokens LoRA tuning learns from (`chat_nll`); every metric carries a seeded bootstrap 95 %
interval over items (`bootstrap`). `split` draws the evaluation split and its items, `contamination`
drops items that overlap the training data. Multiple-choice questions (MMLU style)
are scored by the log-likelihood the model gives each choice after the prompt, as lm-evaluation-harness
does (`choice`); numeric questions (GSM8K style) by greedy generation and comparison of the final number
(`numeric`). `loading` reads their eval files, `stage.evaluate_model` runs every metric on one model, and
`metrics` is the `metrics.json` the evaluate stage writes, as pydantic models. `harness` runs
lm-evaluation-harness tasks on the same in-memory model, with bootstrap CIs from lm-eval's per-sample log.
`primary` names the metric to read first (chat perplexity for requests with references, raw-text
perplexity for a plain-text domain). `paired` compares two models on the same items by a paired
bootstrap over the per-item numbers the evaluate stage stores (`evaluate_model(items=...)`,
`harness_metrics(samples=...)`). `stage.run` is the evaluation stage's entry. Prompts come from
`finescope_core.prompts`, final answers from `finescope_core.answers`, generation from
`finescope_core.generate`.
"""

from finescope_core.evaluate.bootstrap import (
    Interval,
    excludes,
    mean_interval,
    overlap,
    paired_mean_difference,
    paired_perplexity_ratio,
    perplexity_interval,
)
from finescope_core.evaluate.choice import (
    check_mc_item,
    choice_logprobs,
    encode_continuation,
    mc_accuracy,
    mc_hits,
    mc_prompt,
)
from finescope_core.evaluate.contamination import Contamination, check_contamination, internal_duplicates
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.harness import (
    bootstrap_ci,
    check_harness_config,
    harness_include_sha,
    harness_limit,
    harness_metrics,
    run_harness,
    task_samples,
)
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE
from finescope_core.evaluate.loading import load_mc_items, load_numeric_items
from finescope_core.evaluate.metrics import (
    REQUIRED_MODELS,
    Comparison,
    EvalCounts,
    MetricsDocument,
    ModelMetrics,
    ModelsByName,
    metrics_schema_errors,
)
from finescope_core.evaluate.numeric import (
    STOP_STRINGS,
    check_numeric_item,
    extract_number,
    generate_answers,
    generation_prompt,
    numeric_exact_match,
    numeric_hits,
    reference_number,
)
from finescope_core.evaluate.paired import ITEMS_FILE, comparisons, items_document
from finescope_core.evaluate.perplexity import chat_nll, perplexity, text_nll
from finescope_core.evaluate.primary import PRIMARY_METRICS, primary_metric
from finescope_core.evaluate.stage import METRICS_FILE, EvalInputs, evaluate_model, run, with_harness

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ITEMS_FILE",
    "METRICS_FILE",
    "PRIMARY_METRICS",
    "REQUIRED_MODELS",
    "STOP_STRINGS",
    "Comparison",
    "Contamination",
    "EvalCounts",
    "EvalError",
    "EvalInputs",
    "Interval",
    "MetricsDocument",
    "ModelMetrics",
    "ModelsByName",
    "bootstrap_ci",
    "chat_nll",
    "check_contamination",
    "check_harness_config",
    "check_mc_item",
    "check_numeric_item",
    "choice_logprobs",
    "comparisons",
    "encode_continuation",
    "evaluate_model",
    "excludes",
    "extract_number",
    "generate_answers",
    "generation_prompt",
    "harness_include_sha",
    "harness_limit",
    "harness_metrics",
    "internal_duplicates",
    "items_document",
    "load_mc_items",
    "load_numeric_items",
    "mc_accuracy",
    "mc_hits",
    "mc_prompt",
    "mean_interval",
    "metrics_schema_errors",
    "numeric_exact_match",
    "numeric_hits",
    "overlap",
    "paired_mean_difference",
    "paired_perplexity_ratio",
    "perplexity",
    "perplexity_interval",
    "primary_metric",
    "reference_number",
    "run",
    "run_harness",
    "task_samples",
    "text_nll",
    "with_harness",
]

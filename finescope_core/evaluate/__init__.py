"""Evaluation of base / pruned / tuned models: domain perplexity, multiple-choice accuracy, numeric exact match.

Perplexity is token-level over all held-out texts (`perplexity`). Multiple-choice questions (MMLU style)
are scored by the log-likelihood the model gives each choice after the prompt, as lm-evaluation-harness
does (`choice`); numeric questions (GSM8K style) by greedy generation and comparison of the final number
(`numeric`). `loading` reads their eval files, `stage.evaluate_model` runs every metric on one model, and
`metrics` is the `metrics.json` the evaluate stage writes, as pydantic models.
"""

from finescope_core.evaluate.choice import (
    check_mc_item,
    choice_logprobs,
    encode_continuation,
    mc_accuracy,
    mc_prompt,
)
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE
from finescope_core.evaluate.loading import load_mc_items, load_numeric_items
from finescope_core.evaluate.metrics import (
    REQUIRED_MODELS,
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
    reference_number,
)
from finescope_core.evaluate.perplexity import perplexity
from finescope_core.evaluate.stage import evaluate_model

__all__ = [
    "DEFAULT_BATCH_SIZE", "REQUIRED_MODELS", "STOP_STRINGS", "EvalCounts", "EvalError", "MetricsDocument",
    "ModelMetrics", "ModelsByName", "check_mc_item", "check_numeric_item", "choice_logprobs",
    "encode_continuation", "evaluate_model", "extract_number", "generate_answers", "generation_prompt",
    "load_mc_items", "load_numeric_items", "mc_accuracy", "mc_prompt", "metrics_schema_errors",
    "numeric_exact_match", "perplexity", "reference_number",
]  # fmt: skip

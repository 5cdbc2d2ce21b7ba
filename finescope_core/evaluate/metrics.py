"""The shape of `metrics.json`, which the evaluate stage writes and the report reads."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

REQUIRED_MODELS = ("base", "pruned", "tuned")
ACCURACY_KEYS = ("mc_accuracy", "mc_accuracy_norm", "numeric_exact_match")


def metrics_schema_errors(metrics: Any) -> list[str]:
    """Problems with the shape of `metrics.json`: `{"models": {"base": {...}, "pruned": {...}, "tuned": {...}}}`.

    Each model needs `perplexity` (a finite number > 0) and `parameters` (an int > 0); accuracies, when
    present, are numbers in [0, 1]. More models (baselines such as "pruned-random") are allowed.

    Returns:
        One message per problem, naming the dotted path; empty when the metrics are well formed.
    """
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("models"), Mapping):
        return ["metrics: must be an object with a 'models' object"]
    models = metrics["models"]
    errors = [f"models.{name}: missing" for name in REQUIRED_MODELS if name not in models]
    for name, entry in models.items():
        errors.extend(_model_errors(f"models.{name}", entry))
    return errors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _model_errors(where: str, entry: Any) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"{where}: must be an object of metrics"]
    errors = []
    ppl = entry.get("perplexity")
    if not (_is_number(ppl) and ppl > 0):
        errors.append(f"{where}.perplexity: must be a finite number > 0, got {ppl!r}")
    params = entry.get("parameters")
    if not (isinstance(params, int) and not isinstance(params, bool) and params > 0):
        errors.append(f"{where}.parameters: must be an integer > 0, got {params!r}")
    for key in ACCURACY_KEYS:
        if key in entry and not (_is_number(entry[key]) and 0 <= entry[key] <= 1):
            errors.append(f"{where}.{key}: must be a number in [0, 1], got {entry[key]!r}")
    return errors

"""The comparison models in the layout of the FineScope paper's Table 1: one row per model with whether it
is pruned, whether it is tuned and on which data, then each metric's value [95 % interval] beside its
paired comparison with base on the same items (metrics.json's `comparisons`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finescope_core.report.tables import METRIC_LABELS, interval_cell, paired_number

SHORT_LABELS = {
    "chat_perplexity": "domain ppl (chat)",
    "perplexity": "domain ppl (raw text)",
    "general_perplexity": "general ppl",
    "mc_accuracy": "MC accuracy",
    "mc_accuracy_norm": "MC accuracy (norm.)",
    "numeric_exact_match": "exact match",
}
"""Column names of the metrics (`METRIC_LABELS`' keys), short enough for two columns each."""
DATA_OF = {"random": "random", "corpus": "whole pool", "generic": "generic file"}
"""What each pruning baseline tuned on, as the table's data column reads it."""


def _describe(name: str) -> tuple[bool, bool, str] | None:
    """(pruned, tuned, data) of a model of metrics.json, or None for a model outside the table."""
    if name == "base":
        return False, False, ""
    if name == "tuned-base_tuned":
        return False, True, "curated"
    stage, _, variant = name.partition("-")
    if stage not in ("pruned", "tuned"):
        return None
    data = "curated" if not variant else DATA_OF.get(variant, variant)
    return True, stage == "tuned", data


def _order(names: Sequence[str]) -> list[str]:
    """base, base+tuned, then pruned / pruned+tuned per variant: curated first, baselines as evaluated."""
    head = [n for n in ("base", "tuned-base_tuned", "pruned", "tuned") if n in names]
    variants = [n.partition("-")[2] for n in names if n.startswith("tuned-") and n != "tuned-base_tuned"]
    rest = [n for v in variants for n in (f"pruned-{v}", f"tuned-{v}") if n in names]
    return head + rest


def table1_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model: pruned (yes/no), tuned (yes/no), data, and per metric measured for any model its
    `value [low, high] (n=N)` and the paired ratio (perplexity) or difference (accuracy) against base."""
    models: Mapping[str, Mapping[str, Any]] = metrics["models"]
    vs_base = {(c["a"], c["metric"]): c for c in metrics.get("comparisons") or [] if c["b"] == "base"}
    keys = [k for k in METRIC_LABELS if any(k in m.get("ci", {}) for m in models.values())]
    rows = []
    for name in _order(list(models)):
        described = _describe(name)
        if described is None:
            continue
        pruned, tuned, data = described
        row: dict[str, Any] = {
            "model": name,
            "pruned": "yes" if pruned else "no",
            "tuned": "yes" if tuned else "no",
            "data": data,
        }
        for k in keys:
            row[SHORT_LABELS[k]] = interval_cell(models[name].get("ci", {}).get(k))
            c = vs_base.get((name, k))
            relation = "/ base" if k in ("chat_perplexity", "perplexity", "general_perplexity") else "− base"
            row[f"{SHORT_LABELS[k]} {relation}"] = paired_number(c) if c else ""
        rows.append(row)
    return rows


def has_comparison_models(models: Mapping[str, Any]) -> bool:
    """Whether a run evaluated a baseline (a model beyond base, pruned and tuned): the table is shown then."""
    return any(name not in ("base", "pruned", "tuned") for name in models)

"""Markdown tables of the report: metrics with their intervals, interval and paired comparisons,
lm-evaluation-harness results, example records."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from finescope_core.report.document import ReportError

ACCURACY_LABELS = {
    "mc_accuracy": "MC accuracy",
    "mc_accuracy_norm": "MC accuracy (length-norm.)",
    "numeric_exact_match": "numeric exact match",
}


# ------------------------------------------------------------------------------ intervals table

METRIC_LABELS = {
    "chat_perplexity": "domain perplexity (chat, response tokens)",
    "perplexity": "domain perplexity (raw text)",
    "general_perplexity": "general perplexity (raw text)",
    **ACCURACY_LABELS,
}
"""The metrics with intervals, in table order, and their column names."""
LOWER_IS_BETTER = {"chat_perplexity", "perplexity", "general_perplexity"}


def interval_cell(ci: Mapping[str, Any] | None) -> str:
    """`value [low, high] (n=N)` of one metric's interval, or "" when it was not measured."""
    if not ci:
        return ""
    return f"{ci['value']:.4g} [{ci['low']:.4g}, {ci['high']:.4g}] (n={ci['n']})"


def metric_rows(models: Mapping[str, Mapping[str, Any]], primary: str | None = None) -> list[dict[str, Any]]:
    """One row per model: parameters and, per metric measured for any model, `value [low, high] (n=N)`;
    the `primary` metric (metrics.json's `primary.metric`), when given, first and marked so."""
    keys = [k for k in METRIC_LABELS if any(k in m.get("ci", {}) for m in models.values())]
    if primary in keys:
        keys = [primary, *(k for k in keys if k != primary)]
    labels = {k: METRIC_LABELS[k] + (" — primary" if k == primary else "") for k in keys}
    return [
        {
            "model": name,
            "parameters": m.get("parameters"),
            **{labels[k]: interval_cell(m.get("ci", {}).get(k)) for k in keys},
        }
        for name, m in models.items()
    ]


def comparisons(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Whether the 95 % intervals overlap, per metric: tuned vs base, tuned vs pruned, each baseline's
    tuned (and pruned) model vs the main tuned model. Overlapping intervals: no clear difference at this n."""
    pairs = [("tuned", "base"), ("tuned", "pruned")]
    pairs += [(name, "tuned") for name in models if name.startswith(("tuned-", "pruned-"))]
    lines = []
    for a, b in pairs:
        if a not in models or b not in models:
            continue
        for key in METRIC_LABELS:
            ca, cb = models[a].get("ci", {}).get(key), models[b].get("ci", {}).get(key)
            if not ca or not cb:
                continue
            if ca["low"] <= cb["high"] and cb["low"] <= ca["high"]:
                verdict = "intervals overlap: no clear difference"
            else:
                better = (ca["value"] < cb["value"]) == (key in LOWER_IS_BETTER)
                verdict = f"intervals do not overlap: {a} is {'better' if better else 'worse'}"
            lines.append(
                f"- {a} vs {b}, {METRIC_LABELS[key]}: {interval_cell(ca)} vs {interval_cell(cb)}; {verdict}"
            )
    return lines


PAIRED_LABELS = {
    "chat_perplexity": "chat perplexity",
    "perplexity": "domain perplexity (raw text)",
    "general_perplexity": "general perplexity",
    **ACCURACY_LABELS,
}
"""Short metric names of the paired-comparison lines."""


def _paired_label(metric: str) -> str:
    if metric.startswith("lm_eval:"):
        task, _, name = metric.removeprefix("lm_eval:").partition(":")
        return f"lm-eval {task} {name}"
    return PAIRED_LABELS.get(metric, metric)


def paired_rows(comparisons: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paired comparisons as table rows: a, b, metric, kind, value [low, high], n, clear."""
    return [
        {
            "a": c["a"],
            "b": c["b"],
            "metric": _paired_label(c["metric"]),
            "kind": c["kind"],
            "value [95 % interval]": paired_number(c),
            "n": c["n"],
            "clear": "yes" if c["clear"] else "not at this n",
        }
        for c in comparisons
    ]


def paired_number(c: Mapping[str, Any]) -> str:
    """`value [low, high]`, with 2 decimals or as many more (up to 6) as it takes for the rounded numbers
    to stay on their side of 1 (ratio) / 0 (difference): a clear 0.9997 [0.9995, 0.9999] never reads
    1 [1, 1]."""
    null = 1.0 if c["kind"] == "ratio" else 0.0
    sign = "" if c["kind"] == "ratio" else "+"
    value, low, high = float(c["value"]), float(c["low"]), float(c["high"])
    for digits in range(2, 7):
        r = [round(x, digits) for x in (value, low, high)]
        keeps_value = value == null or r[0] != null
        keeps_bounds = not c["clear"] or (r[1] > null if low > null else r[2] < null)
        if keeps_value and keeps_bounds:
            break
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def paired_lines(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per paired comparison (metrics.json's `comparisons`), e.g.
    `- tuned vs tuned-random — chat perplexity ratio 0.89 [0.84, 0.94], n=150: tuned lower (clear)`;
    a difference reads
    `MC accuracy difference +0.05 [-0.01, +0.11], n=100: tuned higher (not clear at this n)`.
    """
    lines = []
    for c in comparisons:
        null = 1.0 if c["kind"] == "ratio" else 0.0
        if c["value"] == null:
            direction = "no difference"
        else:
            direction = f"{c['a']} {'lower' if c['value'] < null else 'higher'}"
        verdict = "clear" if c["clear"] else "not clear at this n"
        lines.append(
            f"- {c['a']} vs {c['b']} — {_paired_label(c['metric'])} {c['kind']} {paired_number(c)}, "
            f"n={c['n']}: {direction} ({verdict})"
        )
    return lines


# ---------------------------------------------------------------------------------------- markdown

_NEWLINES = re.compile(r"\r\n|\r|\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = format(value, ".4g")
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    return _NEWLINES.sub("<br>", text.replace("\\", "\\\\").replace("|", "\\|"))


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; cells escape `|` and `\\`, newlines become `<br>`.

    Args:
        rows: one mapping per row; a missing key gives an empty cell.
        columns: column order; default: every key, in order of first appearance.

    Returns:
        The table, or "_no data_" when there are no rows.
    """
    if not rows:
        return "_no data_"
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    lines.extend("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows)
    return "\n".join(lines)


def harness_rows(models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """lm-evaluation-harness results as rows task × metric, one column per model: `value [lo, hi]`.

    Args:
        models: metrics.json's `models`; a model's `lm_eval` is `{task: {metric: {value, ci, n, ...}}}`.

    Returns:
        `{"task", "metric", "n", <model>: "0.412 [0.331, 0.494]", ...}` per task and metric, in the order
        first seen; empty when no model has lm-eval results. `n` is the first model's (all share the limit).
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, m in models.items():
        for task, metrics in (m.get("lm_eval") or {}).items():
            for metric, r in metrics.items():
                row = rows.setdefault((task, metric), {"task": task, "metric": metric, "n": r["n"]})
                row[name] = f"{r['value']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
    return list(rows.values())


def harness_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """`harness_rows` as a markdown table (task × model, with 95 % bootstrap CIs); "" without results."""
    rows = harness_rows(models)
    if not rows:
        return ""
    columns = ["task", "metric", "n", *[name for name in models if any(name in row for row in rows)]]
    return markdown_table(rows, columns) + (
        "\n\nValue [95 % CI]: lm-eval's value; the interval is a seeded percentile bootstrap over its "
        "per-sample results. `metrics.json` also holds lm-eval's own stderr."
    )


def example_records_table(
    records: Sequence[Mapping[str, Any]], n: int, text_field: str = "text", *, max_chars: int = 200
) -> str:
    """The first `n` records as a table: rank / score / votes / layers when present, and their text,
    shortened.

    Args:
        records: e.g. curated rows (original fields + rank, score, votes, layers).
        n: rows to show.
        text_field: the field holding the text (e.g. "instruction" for instruction records).
        max_chars: longer texts are cut and end in "…".

    Raises:
        ReportError: a shown record has no `text_field`, naming the fields it has.
    """
    shown = list(records[: max(n, 0)])
    meta = [c for c in ("rank", "score", "votes", "layers") if any(c in r for r in shown)]
    rows = []
    for i, record in enumerate(shown):
        if text_field not in record:
            raise ReportError(
                f"record {i} has no field {text_field!r} (it has {sorted(record)}); "
                "pass text_field= one of those"
            )
        text = str(record[text_field])
        text = text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"
        rows.append({**{c: record.get(c) for c in meta}, text_field: text})
    return markdown_table(rows, [*meta, text_field])

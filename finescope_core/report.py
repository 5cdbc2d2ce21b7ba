"""Evaluation report: PNG plots of each stage's numbers and a markdown page that links them.

Every function takes plain data (numbers, arrays, dicts), never a model. Figures are drawn on
`matplotlib.figure.Figure` objects with the Agg canvas, not through pyplot, so no global figure state
is created or leaked and no display is needed. Empty or non-finite inputs give a "no data" plot that
says why, so a report is always complete.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ACCURACY_LABELS = {
    "mc_accuracy": "MC accuracy",
    "mc_accuracy_norm": "MC accuracy (length-norm.)",
    "numeric_exact_match": "numeric exact match",
}
DPI = 110


class ReportError(ValueError):
    """Bad report input (a missing image, a record without the text field); the message says what to fix."""


@dataclass
class ReportSection:
    """One `##` section of the report: markdown body (tables, prose) followed by images.

    Attributes:
        heading: the section title.
        body: markdown shown under the heading.
        images: PNG paths; linked relative to the report's directory, so they must exist.
    """

    heading: str
    body: str = ""
    images: list[str | Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ drawing


def _new_figure(width: float = 7.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _no_data(out: str | Path, title: str, reason: str) -> Path:
    """A placeholder plot that states why there is nothing to show."""
    fig = _new_figure(6.0, 2.5)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no data: {reason}", ha="center", va="center", wrap=True, fontsize=11)
    return _save(fig, out)


def _finite(values: Any) -> tuple[np.ndarray, int]:
    """The finite entries of `values` as a flat float array, and how many were dropped."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(arr)
    return arr[keep], int((~keep).sum())


def _dropped_note(dropped: int) -> str:
    return f" ({dropped} non-finite values left out)" if dropped else ""


def _bar_labels(ax: Axes, bars: Any, values: Sequence[float], fmt: str) -> None:
    for bar, value in zip(bars, values, strict=True):
        text = "n/a" if not math.isfinite(value) else format(value, fmt)
        height = bar.get_height() if math.isfinite(bar.get_height()) else 0.0
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom", fontsize=8)


# -------------------------------------------------------------------------------------------- plots


def plot_saliency(scores_by_layer: Mapping[int, Any], out: str | Path, *, k_act: int | None = None) -> Path:
    """Per-layer saliency: each layer's scores sorted in decreasing order, on a log scale.

    A steep head means few coordinates carry the layer's sensitivity; the dashed line marks K_act, the
    number of coordinates kept.

    Args:
        scores_by_layer: layer index -> saliency W[l, :] ([d] array-like, any shape is flattened).
        out: PNG path to write.
        k_act: coordinates kept per layer, drawn as a vertical line when given.

    Returns:
        The PNG path.
    """
    title = "Saliency per layer (sorted)"
    curves, dropped = {}, 0
    for layer in sorted(scores_by_layer):
        values, lost = _finite(scores_by_layer[layer])
        dropped += lost
        if values.size:
            curves[layer] = np.sort(values)[::-1]
    if not curves:
        return _no_data(out, title, "no finite saliency scores" + _dropped_note(dropped))
    fig = _new_figure()
    ax = fig.add_subplot()
    for layer, curve in curves.items():
        ax.plot(np.arange(1, curve.size + 1), curve, label=f"layer {layer}", linewidth=1.2)
    if k_act is not None:
        ax.axvline(k_act, color="black", linestyle="--", linewidth=1, label=f"K_act = {k_act}")
    positive = all(float(c.min()) > 0 for c in curves.values())
    ax.set_yscale("log" if positive else "linear")
    ax.set_xlabel("coordinate rank")
    ax.set_ylabel("saliency")
    ax.set_title(title + _dropped_note(dropped))
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out)


def plot_sae_metrics(metrics_by_layer: Mapping[int, Mapping[str, float]], out: str | Path) -> Path:
    """SAE quality per layer: FVU and dead-latent fraction (bars, left), L0 (bars, right).

    Args:
        metrics_by_layer: layer index -> {"fvu": float, "l0": float, "dead_fraction": float}.
        out: PNG path to write.

    Returns:
        The PNG path.

    Raises:
        ReportError: a layer without one of the three metrics.
    """
    title = "SAE metrics per layer"
    if not metrics_by_layer:
        return _no_data(out, title, "no SAE was trained")
    layers = sorted(metrics_by_layer)
    cols = {
        key: [_metric(metrics_by_layer[layer], key, layer) for layer in layers]
        for key in ("fvu", "dead_fraction", "l0")
    }
    x = np.arange(len(layers))
    fig = _new_figure(9.0, 3.8)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for offset, key, label in ((-0.2, "fvu", "FVU"), (0.2, "dead_fraction", "dead fraction")):
        bars = left.bar(x + offset, _zeros_for_nan(cols[key]), width=0.4, label=label)
        _bar_labels(left, bars, cols[key], ".2f")
    bars = right.bar(x, _zeros_for_nan(cols["l0"]), width=0.6, color="tab:green")
    _bar_labels(right, bars, cols["l0"], ".1f")
    for ax, ylabel in ((left, "fraction"), (right, "L0 (active latents per sample)")):
        ax.set_xticks(x, [str(layer) for layer in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
    left.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, out)


def _metric(metrics: Mapping[str, float], key: str, layer: int) -> float:
    if key not in metrics:
        raise ReportError(f"SAE metrics of layer {layer} have no {key!r}; give fvu, l0 and dead_fraction")
    return float(metrics[key])


def _zeros_for_nan(values: Sequence[float]) -> list[float]:
    # A NaN bar is drawn as an empty slot; its label says "n/a".
    return [v if math.isfinite(v) else 0.0 for v in values]


def plot_retrieval_scores(scores: Any, selected_threshold: float | None, out: str | Path) -> Path:
    """Histogram of retrieval scores (each record's pooled seed cosine, `curate.seed_pooling`), with the score of the last record kept.

    Args:
        scores: [N] scores of the whole corpus (or of the selected records).
        selected_threshold: the curated set's cut-off score, drawn as a vertical line; None to omit.
        out: PNG path to write.

    Returns:
        The PNG path.
    """
    title = "Retrieval scores"
    values, dropped = _finite(scores)
    if not values.size:
        return _no_data(out, title, "no finite retrieval scores" + _dropped_note(dropped))
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.hist(values, bins=min(50, max(5, values.size // 5)), color="tab:blue", alpha=0.8)
    if selected_threshold is not None and math.isfinite(selected_threshold):
        kept = int((values >= selected_threshold).sum())
        ax.axvline(
            selected_threshold,
            color="tab:red",
            linestyle="--",
            label=f"cut-off {selected_threshold:.3f} ({kept} kept)",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.set_title(f"{title} (n = {values.size}){_dropped_note(dropped)}")
    return _save(fig, out)


def plot_parameters(params_by_model: Mapping[str, int], out: str | Path) -> Path:
    """Bar chart of parameter counts (millions), labelled with the share of the `base` model's count.

    Returns:
        The PNG path.
    """
    title = "Parameters per model"
    if not params_by_model:
        return _no_data(out, title, "no models")
    names = list(params_by_model)
    counts = [float(params_by_model[n]) for n in names]
    base = float(params_by_model.get("base", 0)) or None
    fig = _new_figure()
    ax = fig.add_subplot()
    bars = ax.bar(names, [c / 1e6 for c in counts], color="tab:purple")
    for bar, count in zip(bars, counts, strict=True):
        label = f"{count / 1e6:.2f}M" + (f"\n{100 * count / base:.0f}%" if base else "")
        ax.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel("parameters (millions)")
    ax.set_title(title)
    ax.margins(y=0.2)
    ax.tick_params(axis="x", labelrotation=20)
    return _save(fig, out)


def plot_eval(metrics: Mapping[str, Any], out: str | Path) -> Path:
    """Perplexity per model (left) and, when any model has them, accuracies per model (right).

    Args:
        metrics: the `metrics.json` shape `{"models": {name: {"perplexity": ..., "mc_accuracy"?: ...}}}`,
            or the inner `{name: {...}}` mapping.
        out: PNG path to write.

    Returns:
        The PNG path.
    """
    models = metrics.get("models", metrics)
    title = "Evaluation"
    if not models:
        return _no_data(out, title, "no models were evaluated")
    names = list(models)
    ppl = [_number(models[n].get("perplexity")) for n in names]
    keys = [k for k in ACCURACY_LABELS if any(k in models[n] for n in names)]
    fig = _new_figure(10.0 if keys else 6.0, 4.0)
    ax = fig.add_subplot(1, 2 if keys else 1, 1)
    bars = ax.bar(
        names, _zeros_for_nan(ppl), color="tab:orange", yerr=_error_bars(models, names, ppl), capsize=3
    )
    _bar_labels(ax, bars, ppl, ".2f")
    ax.set_ylabel("domain perplexity, raw text (lower is better; bars: 95 % interval)")
    ax.tick_params(axis="x", labelrotation=20)
    ax.margins(y=0.15)
    if keys:
        _accuracy_panel(fig.add_subplot(1, 2, 2), models, names, keys)
    fig.suptitle(title)
    return _save(fig, out)


def _error_bars(models: Mapping[str, Any], names: list[str], values: list[float]) -> np.ndarray | None:
    """[2, n] distances from each value to its interval's ends (perplexity `ci`), or None without intervals."""
    cis = [(models[n].get("ci") or {}).get("perplexity") for n in names]
    if not any(cis):
        return None
    low = [v - _number(c["low"]) if c and math.isfinite(v) else 0.0 for v, c in zip(values, cis, strict=True)]
    high = [
        _number(c["high"]) - v if c and math.isfinite(v) else 0.0 for v, c in zip(values, cis, strict=True)
    ]
    return np.asarray(np.maximum(np.array([low, high]), 0.0))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _accuracy_panel(ax: Axes, models: Mapping[str, Any], names: list[str], keys: list[str]) -> None:
    x = np.arange(len(names))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [_number(models[n].get(key)) for n in names]
        bars = ax.bar(
            x + (i - (len(keys) - 1) / 2) * width,
            _zeros_for_nan(values),
            width=width,
            label=ACCURACY_LABELS[key],
        )
        _bar_labels(ax, bars, values, ".2f")
    ax.set_xticks(x, names)
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy (higher is better)")
    ax.legend(fontsize=8)


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


def metric_rows(models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: parameters and, per metric measured for any model, `value [low, high] (n=N)`."""
    keys = [k for k in METRIC_LABELS if any(k in m.get("ci", {}) for m in models.values())]
    return [
        {
            "model": name,
            "parameters": m.get("parameters"),
            **{METRIC_LABELS[k]: interval_cell(m.get("ci", {}).get(k)) for k in keys},
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
            "value [95 % interval]": _paired_number(c),
            "n": c["n"],
            "clear": "yes" if c["clear"] else "not at this n",
        }
        for c in comparisons
    ]


def _paired_number(c: Mapping[str, Any]) -> str:
    """`value [low, high]`, with 2 decimals or as many more (up to 6) as it takes for the rounded numbers
    to stay on their side of 1 (ratio) / 0 (difference): a clear 0.9997 [0.9995, 0.9999] never reads 1 [1, 1]."""
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
    a difference reads `MC accuracy difference +0.05 [-0.01, +0.11], n=100: tuned higher (not clear at this n)`.
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
            f"- {c['a']} vs {c['b']} — {_paired_label(c['metric'])} {c['kind']} {_paired_number(c)}, "
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
    """The first `n` records as a table: rank / score / votes / layers when present, and their text, shortened.

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
                f"record {i} has no field {text_field!r} (it has {sorted(record)}); pass text_field= one of those"
            )
        text = str(record[text_field])
        text = text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"
        rows.append({**{c: record.get(c) for c in meta}, text_field: text})
    return markdown_table(rows, [*meta, text_field])


def _image_link(image: str | Path, out_dir: Path) -> str:
    path = Path(image).resolve()
    if not path.is_file():
        raise ReportError(f"report image {image} does not exist; write the plot before the report")
    rel = Path(os.path.relpath(path, out_dir.resolve())).as_posix()
    return f"![{path.stem}]({rel})"


def write_report(out_dir: str | Path, *, title: str, sections: Sequence[ReportSection]) -> Path:
    """Write `report.md` in `out_dir`: the title, then each section's heading, body and images.

    Images are linked by paths relative to `out_dir`, so the directory can be moved or uploaded whole.

    Returns:
        The path of `report.md`.

    Raises:
        ReportError: an image file does not exist.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.heading}", ""]
        if section.body.strip():
            parts += [section.body.strip(), ""]
        parts += [line for image in section.images for line in (_image_link(image, out), "")]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


_IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")


def embed_images(markdown: str, base_dir: str | Path) -> str:
    """`markdown` with every relative PNG link replaced by an inline `data:` URI.

    A report shown where its files are not (a Prefect artifact in the UI, a chat message) has no
    directory to resolve relative links against, so the pictures must travel inside the text.

    Raises:
        ReportError: a linked image is missing, or is not a PNG.
    """
    base = Path(base_dir)

    def inline(match: re.Match[str]) -> str:
        src = match["src"]
        if src.startswith(("data:", "http://", "https://")):
            return match[0]
        path = base / src
        if not path.is_file():
            raise ReportError(
                f"report image {src} does not exist under {base}; write the plot before embedding"
            )
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG"):
            raise ReportError(f"report image {path} is not a PNG; only PNG plots can be embedded")
        return f"![{match['alt']}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"

    return _IMAGE_LINK.sub(inline, markdown)

"""PNG plots of each stage's numbers.

Every function takes plain data (numbers, arrays, dicts), never a model. Figures are drawn on
`matplotlib.figure.Figure` objects with the Agg canvas, not through pyplot, so no global figure state
is created or leaked and no display is needed. Empty or non-finite inputs give a "no data" plot that
says why, so a report is always complete.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finescope_core.report.document import ReportError
from finescope_core.report.tables import ACCURACY_LABELS

DPI = 110


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
    """Histogram of retrieval scores (each record's pooled seed cosine, `curate.seed_pooling`), with the
    score of the last record kept.

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
    """[2, n] distances from each value to its interval's ends (perplexity `ci`), or None without
    intervals."""
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

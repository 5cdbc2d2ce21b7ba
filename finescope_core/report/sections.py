"""The sections of the report, one per stage (the primary metric and the warnings first), each with its
plot.

Each section reads the run's artifacts as they are on disk (the curated set's directory, the saliency
artifact) or the numbers of `metrics.json`, and writes its plot into the report's work directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finescope_core.curate import SCORES_FILE, load_scores
from finescope_core.data import shown_text
from finescope_core.evaluate.leakage import ITEM_KINDS
from finescope_core.io import read_jsonl
from finescope_core.report.document import ReportSection
from finescope_core.report.inputs import ReportInputs
from finescope_core.report.plots import (
    plot_eval,
    plot_parameters,
    plot_retrieval_scores,
    plot_sae_metrics,
    plot_saliency,
)
from finescope_core.report.table1 import has_comparison_models, table1_rows
from finescope_core.report.tables import (
    METRIC_LABELS,
    comparisons,
    example_records_table,
    harness_table,
    interval_cell,
    markdown_table,
    metric_rows,
    paired_lines,
)
from finescope_core.saliency import LayerSaliency

CURATED_ROWS = "curated.jsonl"
"""The curated artifact's records, best first (written by `finescope_core.curate`)."""
CURATION_SUMMARY = "curation.json"
"""The curated artifact's summary, with the per-layer weights (written by `finescope_core.curate`)."""
SALIENCY_PLOT = "saliency.png"
SAE_PLOT = "sae.png"
RETRIEVAL_PLOT = "retrieval.png"
PARAMETERS_PLOT = "parameters.png"
EVALUATION_PLOT = "evaluation.png"


def report_sections(inputs: ReportInputs, k_act: int, work: Path) -> list[ReportSection]:
    """One section per stage, each with its plot written into `work`."""
    # The warnings first (what may make every number below misleading), then the number to read first.
    sections = _warnings_section(inputs.metrics) + primary_section(inputs.metrics)
    if inputs.saliency_dir is not None:
        sal = LayerSaliency.load(inputs.saliency_dir)
        scores = {layer: sal.scores[i].numpy() for i, layer in enumerate(sal.layers)}
        sections.append(
            ReportSection(
                "Saliency per layer",
                f"selector `{sal.selector}`, k_act {k_act}",
                [plot_saliency(scores, work / SALIENCY_PLOT, k_act=k_act)],
            )
        )
    if inputs.sae_metrics is not None:
        rows = [{"layer": k, **{m: round(v, 4) for m, v in d.items()}} for k, d in inputs.sae_metrics.items()]
        held_out = any("val_fvu" in d for d in inputs.sae_metrics.values())
        note = (
            "\n\n`fvu`, `l0`, `dead_fraction`: training rows; `val_*`: the held-out rows "
            "(`curate.sae.val_fraction`)."
            if held_out
            else ""
        )
        sections.append(
            ReportSection(
                "SAE metrics",
                markdown_table(rows) + note,
                [plot_sae_metrics(inputs.sae_metrics, work / SAE_PLOT)],
            )
        )
    sections.append(_curated_section(inputs.curated_dir, work))
    weights = layer_weights_section(inputs.curated_dir)
    if weights is not None:
        sections.append(weights)
    sections.append(_parameters_section(inputs.metrics, inputs.prune_info, work))
    sections += recovery_section(inputs.metrics)
    sections.append(
        ReportSection(
            "Evaluation",
            evaluation_body(inputs.metrics),
            [plot_eval(inputs.metrics, work / EVALUATION_PLOT)],
        )
    )
    sections += _harness_section(inputs.metrics)
    return sections


def recovery_section(metrics: Mapping[str, Any]) -> list[ReportSection]:
    """Each variant's distillation phase over its pool (metrics.json `recovery`), when it ran."""
    found = metrics.get("recovery") or {}
    rows = [
        {
            "variant": name,
            "tokens": info.get("tokens"),
            "steps": info.get("steps"),
            "seconds": info.get("seconds"),
            "loss start → end": f"{info.get('loss_start', 0):.4g} → {info.get('loss_end', 0):.4g}",
            "records read (nearest / general)": f"{info.get('nearest_read')} / {info.get('general_read')}",
        }
        for name, info in found.items()
    ]
    body = "`T²·KL(teacher ‖ student)` (+ `recover.ce_weight` · CE) over packed texts of each variant's pool"
    return [ReportSection("Recovery over the corpus", f"{body}\n\n{markdown_table(rows)}")] if rows else []


def primary_section(metrics: Mapping[str, Any]) -> list[ReportSection]:
    """The metric to read first (metrics.json `primary`), every model's value of it, and the paired
    comparisons of the tuned model with base and with each baseline's tuned model on it."""
    primary = metrics.get("primary")
    if not primary:
        return []
    metric = primary["metric"]
    lines = [f"**{METRIC_LABELS[metric]}** (`{metric}`): {primary['why']}.", ""]
    lines += [f"- {name}: {interval_cell(m['ci'].get(metric))}" for name, m in metrics["models"].items()]
    headline = [
        c
        for c in metrics.get("comparisons") or []
        if c["metric"] == metric and c["a"] == "tuned" and (c["b"] == "base" or c["b"].startswith("tuned-"))
    ]
    if headline:
        lines += ["", "Paired on the same items:", "", *paired_lines(headline)]
    return [ReportSection("Primary metric", "\n".join(lines))]


def _warnings_section(metrics: Mapping[str, Any]) -> list[ReportSection]:
    """The run's warnings (metrics.json `warnings`: data lost, thin evaluation sets), first, when any."""
    found = metrics.get("warnings") or []
    return [ReportSection("Warnings", "\n".join(f"- {w}" for w in found))] if found else []


def evaluation_body(metrics: Mapping[str, Any]) -> str:
    """The model x metric table (value [95 % interval] (n)), how the eval sets were made, the interval
    overlap comparisons and, when metrics.json has them, the paired comparisons on the same items."""
    models = metrics["models"]
    parts = [
        "Every model is scored on the same items. Each cell is the value with its bootstrap 95 % interval "
        "(items resampled, seeded) and n.",
        markdown_table(metric_rows(models, (metrics.get("primary") or {}).get("metric"))),
    ]
    if has_comparison_models(models):
        parts.append(
            "The comparison models as in the FineScope paper's Table 1: base, the unpruned base tuned on the "
            "curated data (`base_tuned`), and pruned / pruned + tuned for the curated data and each baseline "
            "(pruned on its own data, tuned on its own distilled data). Beside each metric, the paired ratio "
            "(perplexity) or difference (accuracy) against base on the same items, with its 95 % "
            "interval.\n\n" + markdown_table(table1_rows(metrics))
        )
    info = metrics.get("evaluation")
    if info:
        parts.append(_eval_sets_text(info))
    lines = comparisons(models)
    if lines:
        parts.append(
            "Comparisons (overlapping intervals: the difference is not clear at this n):\n\n"
            + "\n".join(lines)
        )
    paired = paired_lines(metrics.get("comparisons") or [])
    if paired:
        parts.append(
            "Paired comparisons (same items, bootstrap over items): each resample draws one set of items "
            "and recomputes both models' metric on it, giving a 95 % interval for the ratio of perplexities "
            "(A / B) or the difference of accuracies (A − B); clear when it excludes 1 / 0. Two models whose "
            "separate intervals overlap can still differ clearly when paired.\n\n" + "\n".join(paired)
        )
    return "\n\n".join(parts)


def _eval_sets_text(info: Mapping[str, Any]) -> str:
    lines = []
    for name in ITEM_KINDS:
        d = info.get(name) or {}
        if d:
            lines.append(
                f"- {name} items: {d.get('rule', '?')} ({d.get('source', '?')}); "
                f"{d.get('kept', '?')} kept of {d.get('checked', '?')}, dropped as contaminated: "
                f"{d.get('dropped_ngram', 0)} by 13-gram overlap, "
                f"{d.get('dropped_near_duplicate', 0)} as near duplicates"
            )
    split = info.get("split") or {}
    if split:
        lines.append(
            f"- evaluation split: {split.get('records', 0)} corpus records "
            f"(share {split.get('fraction')}), kept out of "
            f"curation, pruning, teacher, tuning and baselines; within it {split.get('exact', 0)} exact and "
            f"{split.get('near', 0)} near duplicates"
        )
    if info.get("eval_file_duplicates_removed_from_pool"):
        by_kind = ", ".join(f"{k}: {n}" for k, n in (info.get("pool_duplicates_by_kind") or {}).items())
        total = info["eval_file_duplicates_removed_from_pool"]
        lines.append(
            "- corpus records removed from the curation pool as duplicates of eval-file items: "
            f"{total}" + (f" ({by_kind})" if by_kind else "")
        )
    if info.get("contamination_rule"):
        lines.append(f"- contamination check: {info['contamination_rule']}")
    return "\n".join(lines)


def _harness_section(metrics: Mapping[str, Any]) -> list[ReportSection]:
    """The lm-evaluation-harness table (task × model, with CIs), when the run ran lm-eval tasks."""
    table = harness_table(metrics["models"])
    return [ReportSection("lm-evaluation-harness", table)] if table else []


def _curated_section(curated_dir: Path, work: Path) -> ReportSection:
    rows = read_jsonl(curated_dir / CURATED_ROWS)
    images: list[str | Path] = []
    if (curated_dir / SCORES_FILE).is_file():
        cut = rows[-1]["score"] if rows else None
        images.append(
            plot_retrieval_scores(load_scores(curated_dir / SCORES_FILE)[0], cut, work / RETRIEVAL_PLOT)
        )
    examples = [{"text": shown_text(r), **{k: r[k] for k in ("rank", "id", "score", "votes")}} for r in rows]
    return ReportSection("Curated set", example_records_table(examples, 8), images)


def layer_weights_section(curated_dir: Path) -> ReportSection | None:
    """Each voting layer's weight in the vote and its mean top-M score, from `curation.json`.

    None when the curation had no layers (`random`) or predates the per-layer summary. A plain vote
    (`curate.layer_weighting: vote`) records no weights: every layer counts 1.
    """
    path = curated_dir / CURATION_SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    per_layer: Mapping[str, Mapping[str, float]] = summary.get("per_layer") or {}
    if not per_layer:
        return None
    rows = [
        {
            "layer": layer,
            "weight": round(float(d.get("weight", 1.0)), 4),
            "mean top-M score": round(float(d["mean_top_score"]), 4),
        }
        for layer, d in sorted(per_layer.items(), key=lambda kv: int(kv[0]))
    ]
    rule = summary.get("layer_weighting", "vote")
    top_m = summary.get("effective_top_m")
    note = f"Weighting `{rule}`" + (f", per-layer top-{top_m}." if top_m is not None else ".")
    if "-1" in per_layer:
        note += " Layer -1 is the sentence embedding (one space, so its weight is 1)."
    return ReportSection("Layer weights", f"{note}\n\n{markdown_table(rows)}")


def _parameters_section(
    metrics: Mapping[str, Any], prune_info: Mapping[str, Any], work: Path
) -> ReportSection:
    params = {name: m["parameters"] for name, m in metrics["models"].items()}
    before, after = prune_info["params_before"], prune_info["params_after"]
    body = markdown_table([{"module": k, "before": v, "after": after.get(k)} for k, v in before.items()])
    body += f"\n\nAchieved ratio {prune_info['achieved_ratio']:.4f} (target {prune_info['target_ratio']})."
    return ReportSection("Parameters", body, [plot_parameters(params, work / PARAMETERS_PLOT)])

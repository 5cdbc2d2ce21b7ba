"""The metrics document and the task of the `report` stage: report.md with plots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from finescope_core import report as rep
from finescope_core.config import FinescopeConfig
from finescope_core.curate import load_embeddings
from finescope_core.data import (
    shown_text,
)
from finescope_core.evaluate import (
    metrics_schema_errors,
)
from finescope_core.io import read_jsonl
from finescope_core.saliency import LayerSaliency
from tasks.common import (
    RUN_RESULTS,
    STORE_RETRIES,
    StageKey,
    StageKeyModel,
    StageManifest,
    artifact_dir,
    open_store,
    run_cached,
)

# CurateResult's stage fields and their names in metrics.json's stage_seconds, in pipeline order.
CURATE_SECONDS = {"corpus": "corpus", "seeds": "seeds", "saliency": "saliency", "activations": "activations-corpus",
                  "seed_activations": "activations-seeds", "sae": "sae", "curated": "curated"}  # fmt: skip


def stage_seconds(
    curate: dict[str, StageManifest | None], variants: dict[str, list[StageManifest]], evaluations: dict[str, StageManifest]
) -> dict[str, float]:
    """Seconds each stage took when it was computed (a cached stage reports its original time).

    Args:
        curate: the curate stages by CurateResult field name (`CURATE_SECONDS`); None for skipped ones.
        variants: each variant's (pruned, distilled, tuned) by variant name ("" for the curated one).
    """
    out = {CURATE_SECONDS[f]: round(m.seconds, 1) for f in CURATE_SECONDS if (m := curate.get(f)) is not None}
    for name, stages in variants.items():
        for m in stages:
            out[f"{m.stage}{'-' + name if name else ''}"] = round(m.seconds, 1)
    for name, m in evaluations.items():
        out[f"evaluate-{name}"] = round(m.seconds, 1)
    return out


def metrics_document(evaluations: dict[str, StageManifest], seconds: dict[str, float]) -> dict[str, Any]:
    """`metrics.json`: {"models": {name: metrics}, "stage_seconds": {...}}, schema-checked."""
    doc = {"models": {name: m.info for name, m in evaluations.items()}, "stage_seconds": seconds}
    errors = metrics_schema_errors(doc)
    if errors:
        raise ValueError("metrics.json would be malformed: " + "; ".join(errors))
    return doc


def _retrieval_scores(emb_path: Path) -> np.ndarray:
    """Every corpus record's score as the curated set defines it: max-over-seeds cosine, mean over layers."""
    corpus, seeds = load_embeddings(emb_path)
    per_layer = []
    for layer, c in corpus.items():
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        s = seeds[layer] / np.maximum(np.linalg.norm(seeds[layer], axis=1, keepdims=True), 1e-12)
        per_layer.append((c @ s.T).max(axis=1))
    return np.mean(per_layer, axis=0)


class ReportKey(StageKeyModel):
    """`report`: what the report shows, on the metrics document, the curated set and the pruned model."""

    STAGE = "report"
    VERSION = "2"
    CONFIG = {"ratio": "prune.ratio", "method": "curate.method", "k_act": "curate.k_act"}

    ratio: float
    method: str
    k_act: int


def report_key(cfg: FinescopeConfig, metrics: dict[str, Any], curated_sha: str, pruned_sha: str) -> StageKey:
    metrics_sha = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()
    return ReportKey.of(cfg, {"metrics": metrics_sha, "curated": curated_sha, "pruned": pruned_sha}).spec()


@task(name="report", cache_policy=RUN_RESULTS, **STORE_RETRIES)
def report_task(cfg: FinescopeConfig, curate: Any, metrics: dict[str, Any], pruned: StageManifest) -> StageManifest:
    """report.md with plots: saliency, SAE metrics, retrieval scores + examples, parameters, evaluation."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        sections = _report_sections(cfg, store, curate, metrics, pruned.info, work)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rep.write_report(work, title=f"finescope: {cfg.curate.method} curation, ratio {cfg.prune.ratio}", sections=sections)
        return {"sections": [s.heading for s in sections]}

    return run_cached(store, report_key(cfg, metrics, curate.curated.sha256, pruned.sha256), build)


def _report_sections(cfg, store, curate, metrics, prune_info, work: Path) -> list[rep.ReportSection]:
    sections = []
    if curate.saliency is not None:
        sal = LayerSaliency.load(artifact_dir(store, curate.saliency))
        scores = {layer: sal.scores[i].numpy() for i, layer in enumerate(sal.layers)}
        sections.append(rep.ReportSection("Saliency per layer", f"selector `{sal.selector}`, k_act {cfg.curate.k_act}",
                                          [rep.plot_saliency(scores, work / "saliency.png", k_act=cfg.curate.k_act)]))
    if curate.sae is not None:
        by_layer = dict(zip(curate.layers, curate.sae.info["metrics"], strict=True))
        rows = [{"layer": k, **{m: round(v, 4) for m, v in d.items()}} for k, d in by_layer.items()]
        sections.append(rep.ReportSection("SAE metrics", rep.markdown_table(rows), [rep.plot_sae_metrics(by_layer, work / "sae.png")]))
    curated_dir = artifact_dir(store, curate.curated)
    curated_rows = read_jsonl(curated_dir / "curated.jsonl")
    images = []
    if (curated_dir / "embeddings.safetensors").is_file():
        cut = curated_rows[-1]["score"] if curated_rows else None
        images.append(rep.plot_retrieval_scores(_retrieval_scores(curated_dir / "embeddings.safetensors"), cut, work / "retrieval.png"))
    examples = [{"text": shown_text(r), **{k: r[k] for k in ("rank", "id", "score", "votes")}} for r in curated_rows]
    sections.append(rep.ReportSection("Curated set", rep.example_records_table(examples, 8), images))
    params = {name: m["parameters"] for name, m in metrics["models"].items()}
    body = rep.markdown_table([{"module": k, "before": v, "after": prune_info["params_after"].get(k)} for k, v in prune_info["params_before"].items()])
    body += f"\n\nAchieved ratio {prune_info['achieved_ratio']:.4f} (target {prune_info['target_ratio']})."
    sections.append(rep.ReportSection("Parameters", body, [rep.plot_parameters(params, work / "parameters.png")]))
    table = [{"model": name, **{k: v for k, v in m.items() if k != "n"}} for name, m in metrics["models"].items()]
    sections.append(rep.ReportSection("Evaluation", rep.markdown_table(table), [rep.plot_eval(metrics, work / "evaluation.png")]))
    return sections

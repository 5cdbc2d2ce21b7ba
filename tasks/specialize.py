"""Prefect tasks of the `specialize` flow after pruning: teacher generation, LoRA tuning, evaluation, report."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from finescope_core import report as rep
from finescope_core.config import FinescopeConfig
from finescope_core.curate import load_embeddings
from finescope_core.data import Record, load_records, shown_text
from finescope_core.evaluate import evaluate_model, load_mc_items, load_numeric_items, metrics_schema_errors
from finescope_core.finetune import lora_finetune
from finescope_core.model import load_model
from finescope_core.saliency import LayerSaliency
from finescope_core.teacher import generate_distilled, read_distilled
from tasks.common import (
    RUN_RESULTS,
    ModelRef,
    Progress,
    StageKey,
    StageManifest,
    artifact_dir,
    model_ref,
    open_store,
    run_cached,
    storage_options,
)
from tasks.curate import GPU_TAGS, IO_RETRIES, STORE_RETRIES


def records_sha(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.fields], sort_keys=True, default=str).encode())
    return h.hexdigest()


def baseline_records(name: str, corpus: list[Record], held_ids: set[str], size: int, seed: int) -> list[Record]:
    """`random`: a seeded corpus sample as large as the curated training set; `corpus`: the whole corpus."""
    pool = [r for r in corpus if r.id not in held_ids]
    if name == "corpus":
        return pool
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), min(size, len(pool))))]


def teacher_ref(cfg: FinescopeConfig, base: ModelRef) -> ModelRef:
    """The teacher: the unpruned base model unless `teacher.model` names another."""
    if cfg.teacher.model == "base":
        return base
    return model_ref(cfg.teacher.model, open_store(cfg))


def distilled_key(cfg: FinescopeConfig, teacher_sha: str, records: list[Record]) -> StageKey:
    """`distilled`: teacher settings, on the teacher model and the records it answers."""
    config = {**cfg.teacher.model_dump(), "seed": cfg.seed}
    return StageKey("distilled", "1", config, {"teacher": teacher_sha, "records": records_sha(records)})


@task(name="teacher", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **IO_RETRIES)
def teacher_task(cfg: FinescopeConfig, teacher: ModelRef, records: list[Record], tag: str) -> StageManifest:
    """Teacher responses (SDFT rewrite when a reference exists), written incrementally; resumes after a kill."""

    def build(work: Path) -> dict[str, Any]:
        model, tok = load_model(teacher.path, Path("."), device=cfg.device)
        summary = generate_distilled(
            model, tok, records, cfg.teacher, work / "distilled.jsonl", progress=Progress(f"teacher ({tag})"), seed=cfg.seed
        )
        return summary.to_dict()

    return run_cached(open_store(cfg), distilled_key(cfg, teacher.sha256, records), build, resume=True)


def tuned_key(cfg: FinescopeConfig, pruned_sha: str, distilled_sha: str) -> StageKey:
    """`tuned`: LoRA settings, on the pruned model and the distilled data."""
    config = {**cfg.finetune.model_dump(), "seed": cfg.seed}
    return StageKey("tuned", "1", config, {"pruned": pruned_sha, "distilled": distilled_sha})


@task(name="finetune", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def finetune_task(cfg: FinescopeConfig, pruned: StageManifest, distilled: StageManifest, tag: str) -> StageManifest:
    """LoRA on the pruned model with the distilled data; adapter + merged model (plain HF directories)."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        model, tok = load_model(str(artifact_dir(store, pruned) / "model"), Path("."), device=cfg.device)
        rows = read_distilled(artifact_dir(store, distilled) / "distilled.jsonl")
        summary = lora_finetune(model, tok, rows, cfg.finetune, work, seed=cfg.seed, progress=Progress(f"finetune ({tag})"))
        info = summary.to_dict()
        return {k: info[k] for k in ("train_examples", "eval_examples", "steps", "eval_loss_before", "eval_loss", "seconds", "tokens_per_second")}

    return run_cached(store, tuned_key(cfg, pruned.sha256, distilled.sha256), build)


def eval_inputs(cfg: FinescopeConfig, heldout_texts: list[str]) -> tuple[list[str], list[dict] | None, list[dict] | None]:
    """Domain texts (a user file, or the held-out curated records) and the optional MC / numeric sets."""
    options = storage_options(cfg)
    ev = cfg.evaluate
    texts = load_records([ev.eval_file], role="evaluate.eval_file", storage_options=options).texts if ev.eval_file else heldout_texts
    mc = load_mc_items(ev.mc_file, storage_options=options) if ev.mc_file else None
    numeric = load_numeric_items(ev.numeric_file, storage_options=options) if ev.numeric_file else None
    return texts, mc, numeric


def evaluation_key(cfg: FinescopeConfig, model_sha: str, data: tuple[list[str], list[dict] | None, list[dict] | None]) -> StageKey:
    """`evaluation`: eval settings, on a model and the eval data `eval_inputs` returns."""
    data_sha = hashlib.sha256(json.dumps(list(data), default=str).encode()).hexdigest()
    return StageKey("evaluation", "1", cfg.evaluate.model_dump(), {"model": model_sha, "data": data_sha})


@task(name="evaluate", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def evaluate_task(cfg: FinescopeConfig, name: str, model_path: str, model_sha: str, heldout_texts: list[str]) -> StageManifest:
    """Perplexity on held-out domain text (+ MC accuracy / numeric exact match when files are given)."""
    texts, mc, numeric = eval_inputs(cfg, heldout_texts)

    def build(work: Path) -> dict[str, Any]:
        model, tok = load_model(model_path, Path("."), device=cfg.device)
        shown = Progress(f"evaluate {name}")
        metrics = evaluate_model(
            model, tok, domain_texts=texts, mc_items=mc, numeric_items=numeric, cfg=cfg.evaluate,
            progress=lambda done, total, **info: shown(done, total),
        )
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

    return run_cached(open_store(cfg), evaluation_key(cfg, model_sha, (texts, mc, numeric)), build)


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


def report_key(cfg: FinescopeConfig, metrics: dict[str, Any], curated_sha: str) -> StageKey:
    """`report`: on the metrics document (every evaluation and stage time) and the curated set."""
    inputs = {"metrics": hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest(), "curated": curated_sha}
    return StageKey("report", "1", {"ratio": cfg.prune.ratio}, inputs)


@task(name="report", cache_policy=RUN_RESULTS, **STORE_RETRIES)
def report_task(cfg: FinescopeConfig, curate: Any, metrics: dict[str, Any], prune_info: dict[str, Any]) -> StageManifest:
    """report.md with plots: saliency, SAE metrics, retrieval scores + examples, parameters, evaluation."""
    store = open_store(cfg)

    def build(work: Path) -> dict[str, Any]:
        sections = _report_sections(cfg, store, curate, metrics, prune_info, work)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rep.write_report(work, title=f"finescope: {cfg.curate.method} curation, ratio {cfg.prune.ratio}", sections=sections)
        return {"sections": [s.heading for s in sections]}

    return run_cached(store, report_key(cfg, metrics, curate.curated.sha256), build)


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
    with open(curated_dir / "curated.jsonl", encoding="utf-8") as f:
        curated_rows = [json.loads(line) for line in f]
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
